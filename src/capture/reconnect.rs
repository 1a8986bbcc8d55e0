//! Reconnecting wrapper for live sources (cameras): when the device fails, report a warning and
//! try to reopen it with exponential backoff instead of ending the run.

use std::time::Duration;

use super::{FrameSource, SourceEvent};
use crate::error::Result;

/// Exponential backoff between reconnect attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(5),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// Delay before attempt `n` (0-based).
    pub fn delay(&self, n: u32) -> Duration {
        let d = self.initial.saturating_mul(1u32 << n.min(16));
        d.min(self.max)
    }
}

/// Opens a source with `open`, and reopens it when it fails.
pub struct Reconnecting<F: FnMut() -> Result<Box<dyn FrameSource>>> {
    open: F,
    current: Option<Box<dyn FrameSource>>,
    name: String,
    backoff: Backoff,
    failures: u32,
    sleep: Box<dyn FnMut(Duration) + Send>,
    /// Set while cancelled, so a reconnect loop stops promptly.
    cancelled: Box<dyn Fn() -> bool + Send>,
    /// Passed on to every (re)opened source.
    keep_color: bool,
}

impl<F: FnMut() -> Result<Box<dyn FrameSource>>> Reconnecting<F> {
    /// `name` is used while no source is open.
    pub fn new(name: impl Into<String>, open: F, backoff: Backoff) -> Self {
        Self {
            open,
            current: None,
            name: name.into(),
            backoff,
            failures: 0,
            sleep: Box::new(std::thread::sleep),
            cancelled: Box::new(|| false),
            keep_color: false,
        }
    }

    /// Starts from an already open source (opened by the caller so that a first failure is an
    /// error rather than a retry), instead of opening one on the first read.
    pub fn with_source(mut self, src: Box<dyn FrameSource>) -> Self {
        self.current = Some(src);
        self
    }

    /// Replaces the sleep function (tests use a fake clock).
    pub fn with_sleep(mut self, sleep: impl FnMut(Duration) + Send + 'static) -> Self {
        self.sleep = Box::new(sleep);
        self
    }

    /// Stops reconnecting once `cancelled()` returns true.
    pub fn with_cancel(mut self, cancelled: impl Fn() -> bool + Send + 'static) -> Self {
        self.cancelled = Box::new(cancelled);
        self
    }
}

impl<F: FnMut() -> Result<Box<dyn FrameSource>>> FrameSource for Reconnecting<F> {
    fn next_event(&mut self) -> Result<SourceEvent> {
        loop {
            if (self.cancelled)() {
                return Ok(SourceEvent::End);
            }
            if self.current.is_none() {
                if self.failures > 0 {
                    (self.sleep)(self.backoff.delay(self.failures - 1));
                }
                match (self.open)() {
                    Ok(mut s) => {
                        s.keep_color(self.keep_color);
                        let reconnected = self.failures > 0;
                        self.current = Some(s);
                        self.failures = 0;
                        if reconnected {
                            return Ok(SourceEvent::Warning(format!("{}: reconnected", self.name)));
                        }
                    }
                    Err(e) => {
                        self.failures += 1;
                        if self
                            .backoff
                            .max_attempts
                            .is_some_and(|m| self.failures >= m)
                        {
                            return Err(e);
                        }
                        return Ok(SourceEvent::Warning(format!(
                            "{}: {e}; retrying in {:.1} s",
                            self.name,
                            self.backoff.delay(self.failures - 1).as_secs_f64()
                        )));
                    }
                }
            }
            let Some(src) = self.current.as_mut() else {
                continue;
            };
            let why = match src.next_event() {
                Ok(SourceEvent::End) => "stopped delivering frames".to_string(),
                Err(e) => e.to_string(),
                other => return other,
            };
            // A live source never ends on its own: the device went away.
            self.current = None;
            self.failures = 1;
            return Ok(SourceEvent::Warning(format!(
                "{}: camera lost ({why}); reconnecting",
                self.name
            )));
        }
    }

    fn name(&self) -> String {
        self.current
            .as_ref()
            .map_or(self.name.clone(), |s| s.name())
    }

    fn fps(&self) -> Option<f64> {
        self.current.as_ref().and_then(|s| s.fps())
    }

    fn keep_color(&mut self, on: bool) {
        self.keep_color = on;
        if let Some(s) = self.current.as_mut() {
            s.keep_color(on);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Frame;
    use crate::error::Error;
    use std::sync::{Arc, Mutex};
    use std::time::{Instant, SystemTime};

    /// A fake camera that delivers `frames` frames and then fails.
    struct Fake {
        left: usize,
    }

    impl FrameSource for Fake {
        fn next_event(&mut self) -> Result<SourceEvent> {
            if self.left == 0 {
                return Err(Error::Msg("VIDIOC_DQBUF: No such device".into()));
            }
            self.left -= 1;
            Ok(SourceEvent::Frame(Frame {
                seq: 0,
                captured: Instant::now(),
                wall: SystemTime::now(),
                width: 1,
                height: 1,
                gray: vec![0],
                label: None,
                chroma: None,
                pts: None,
            }))
        }
        fn name(&self) -> String {
            "camera:0".into()
        }
    }

    #[test]
    fn camera_loss_warns_and_reconnects_with_backoff() {
        // Reopens: fail, fail, ok (1 frame), then always fail.
        let script = Arc::new(Mutex::new(vec![None, None, Some(1)]));
        let s2 = script.clone();
        let open = move || -> Result<Box<dyn FrameSource>> {
            let mut v = s2.lock().unwrap();
            match if v.is_empty() { None } else { v.remove(0) } {
                Some(n) => Ok(Box::new(Fake { left: n })),
                None => Err(Error::Msg("cannot open /dev/video0".into())),
            }
        };
        let slept = Arc::new(Mutex::new(Vec::new()));
        let sl = slept.clone();
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(300),
            max_attempts: Some(5),
        };
        // The caller opened the first camera itself; the script covers the reopens.
        let mut src = Reconnecting::new("camera:0", open, backoff)
            .with_source(Box::new(Fake { left: 2 }))
            .with_sleep(move |d| sl.lock().unwrap().push(d));
        let mut events = Vec::new();
        loop {
            match src.next_event() {
                Ok(SourceEvent::Frame(_)) => events.push("frame".to_string()),
                Ok(SourceEvent::Warning(w)) => events.push(format!("warn:{w}")),
                Ok(SourceEvent::End) => break,
                Err(e) => {
                    events.push(format!("error:{e}"));
                    break;
                }
            }
        }
        assert_eq!(events[0], "frame");
        assert_eq!(events[1], "frame");
        assert!(
            events[2].contains("camera lost (VIDIOC_DQBUF: No such device)"),
            "{events:?}"
        );
        assert!(
            events[3].contains("cannot open /dev/video0; retrying"),
            "{events:?}"
        );
        assert!(events[5].contains("reconnected"), "{events:?}");
        assert_eq!(events[6], "frame");
        assert!(events.last().unwrap().starts_with("error:"), "{events:?}");
        // Backoff grows and is capped.
        let d = slept.lock().unwrap().clone();
        assert_eq!(d[0], Duration::from_millis(100));
        assert!(d.iter().all(|x| *x <= Duration::from_millis(300)));
        assert!(d.windows(2).any(|w| w[1] > w[0]));
    }
}
