//! One colour per emotion class, shared by the annotated video and the report's plots, so a
//! colour means the same class everywhere.

/// RGB of a class: fixed for FER+'s eight names (FER2013's seven and contempt, synonyms
/// folded), a palette by position for other names.
pub fn class_rgb(name: &str, index: usize) -> (u8, u8, u8) {
    match crate::config::canonical_class(name).as_str() {
        // Okabe and Ito's palette for colour-blind readers: angry and disgust differ in hue
        // and lightness for every common form of colour blindness, and neutral (near-black)
        // is unlike the report's light grey "uncertain" band.
        "angry" => (213, 94, 0),
        "disgust" => (0, 158, 115),
        "fear" => (204, 121, 167),
        "happy" => (230, 159, 0),
        "sad" => (0, 114, 178),
        "surprise" => (86, 180, 233),
        "neutral" => (40, 40, 40),
        "contempt" => (240, 228, 66),
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
