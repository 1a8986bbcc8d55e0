use candle_core::Device;
use fer_cam::config::Tta;
use fer_cam::data::{load, LoadOptions};
use fer_cam::Classifier;
fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let (ds, _) = load(
        std::path::Path::new(&a[1]),
        &LoadOptions::with_default_cache(),
    )?;
    let ds = fer_cam::data::ferplus::relabel(&ds, std::path::Path::new(&a[2]), true)?.0;
    let ds = ds.select_split(&a[4])?;
    let mut clf = Classifier::load_builtin(&a[3], &Device::Cpu)?;
    for tta in [Tta::Flip, Tta::TenCrop] {
        clf.set_tta(tta)?;
        let (mut v, mut p, mut f) = (0, 0, 0);
        for (ch, lb) in ds.pixels.chunks(48 * 48 * 64).zip(ds.labels.chunks(64)) {
            for (pr, &l) in clf.predict(ch)?.iter().zip(lb) {
                let am = |x: &[f32]| (0..x.len()).max_by(|&i, &j| x[i].total_cmp(&x[j])).unwrap();
                v += usize::from(pr.card.label == l as usize);
                p += usize::from(am(&pr.card.probs) == l as usize);
                f += usize::from(am(&pr.fphi_probs) == l as usize);
            }
        }
        let n = ds.len() as f64 / 100.0;
        println!(
            "{tta:?}: vote {:.2} mean-probs {:.2} fphi {:.2}",
            v as f64 / n,
            p as f64 / n,
            f as f64 / n
        );
    }
    Ok(())
}
