//! The inference stage: batches the faces of the frames waiting, runs the encoder and the CARD
//! sampler on them, and smooths each track's probabilities.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::capture::Counters;
use super::{Classified, FaceJob, RunConfig};
use crate::emit::{ClassMap, FaceOut};
use crate::error::{Error, Result};
use crate::face::Smoother;
use crate::infer::Classifier;

pub(super) fn infer_loop(
    cfg: &RunConfig,
    mut clf: Classifier,
    rx: Receiver<FaceJob>,
    tx: Sender<Classified>,
    cancel: &AtomicBool,
    counters: &Counters,
) -> Result<()> {
    let names = Arc::new(clf.config().classes.clone());
    let side = clf.config().input.size;
    let mut smoother = Smoother::new(cfg.smooth);
    while let Ok(first) = rx.recv() {
        // Batch the faces of this frame with those of frames already waiting. File input read
        // as fast as possible classifies frame by frame instead: which frames are waiting
        // depends on timing, and a batch's size changes the last bits of its sums, so only this
        // keeps a file's output the same from run to run.
        let mut jobs = vec![first];
        let mut faces: usize = jobs[0].faces.len();
        while faces < cfg.max_batch && (cfg.live || cfg.realtime) {
            match rx.try_recv() {
                Ok(j) => {
                    faces += j.faces.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        // Stopping: frames that were only queued are counted, not classified.
        if cancel.load(Ordering::SeqCst) {
            counters
                .stopped
                .fetch_add(jobs.len() as u64, Ordering::Relaxed);
            continue;
        }
        let t = Instant::now();
        let waits: Vec<f64> = jobs
            .iter()
            .map(|j| (t - j.done).as_secs_f64() * 1e3)
            .collect();
        let crops: Vec<u8> = jobs.iter().flat_map(|j| j.crops.iter().copied()).collect();
        let preds = if crops.is_empty() {
            Vec::new()
        } else if side == 48 {
            clf.predict(&crops)?
        } else {
            return Err(Error::Config(format!(
                "model input size {side} (the daemon crops 48x48)"
            )));
        };
        let infer_ms = t.elapsed().as_secs_f64() * 1e3;
        let done = Instant::now();
        let mut preds = preds.into_iter();
        for (job, wait_ms) in jobs.into_iter().zip(waits) {
            let mut out = Vec::with_capacity(job.faces.len());
            let mut failed = Vec::new();
            for (id, b) in &job.faces {
                let Some(p) = preds.next() else { break };
                // A NaN is never an answer: the face is reported as failed instead.
                if !p.is_finite() {
                    failed.push(*id);
                    continue;
                }
                let probs = smoother.smooth(*id, job.frame.seq, &p.card.probs);
                let label = if cfg.smooth < 1.0 {
                    crate::metrics::argmax(&probs)
                } else {
                    p.card.label
                };
                out.push(FaceOut {
                    id: *id,
                    bbox: [
                        b.x.round() as i32,
                        b.y.round() as i32,
                        b.w.round() as i32,
                        b.h.round() as i32,
                    ],
                    det_score: (b.score * 1000.0).round() / 1000.0,
                    roll_deg: b
                        .roll
                        .map(|r| (r.to_degrees() as f64 * 10.0).round() / 10.0),
                    label: names.get(label).cloned().unwrap_or_default(),
                    probs: ClassMap {
                        names: names.clone(),
                        values: probs,
                    },
                    votes: ClassMap {
                        names: names.clone(),
                        values: p.card.votes.clone(),
                    },
                    certain: p.card.certain,
                    p_value: p.card.p_value.is_finite().then_some(p.card.p_value),
                    entropy: (p.card.entropy as f64 * 1e4).round() / 1e4,
                });
            }
            let r = Classified {
                job,
                out,
                failed,
                wait_ms,
                infer_ms,
                done,
            };
            if tx.send(r).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
