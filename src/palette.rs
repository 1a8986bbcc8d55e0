//! One colour per emotion class, shared by the annotated video and the report's plots, so a
//! colour means the same class everywhere.

/// RGB of a class: fixed for FER+'s eight names (FER2013's seven and contempt, synonyms
/// folded), a palette by position for other names.
pub fn class_rgb(name: &str, index: usize) -> (u8, u8, u8) {
    match crate::config::canonical_class(name).as_str() {
        "angry" => (220, 40, 40),
        "disgust" => (110, 170, 40),
        "fear" => (150, 70, 210),
        "happy" => (250, 205, 30),
        "sad" => (40, 110, 230),
        "surprise" => (250, 130, 20),
        "neutral" => (150, 150, 150),
        "contempt" => (20, 160, 150),
        _ => [
            (0, 170, 170),
            (200, 60, 150),
            (120, 90, 40),
            (90, 200, 120),
            (230, 120, 120),
            (60, 60, 160),
        ][index % 6],
    }
}
