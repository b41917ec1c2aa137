//! The lock-free single-producer/single-consumer ring between a source (the
//! cpal callback or a reader thread) and the audio thread, plus the counters
//! both sides share. The producer side never blocks, locks or allocates:
//! when the ring is full the samples that do not fit are dropped and counted.

use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// State shared by the two ends of a ring and whoever watches the stream.
#[derive(Debug, Default)]
pub struct RingShared {
    /// Samples the producer could not store because the ring was full.
    pub dropped_samples: AtomicU64,
    /// Times the producer found the ring full.
    pub overflow_events: AtomicU64,
    /// Samples written so far.
    pub written_samples: AtomicU64,
    /// Set by the producer when its input ended (end of file or stdin).
    pub finished: AtomicBool,
    /// Set by a source whose device failed; the message says why.
    failure: Mutex<Option<String>>,
}

impl RingShared {
    pub fn fail(&self, message: String) {
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(message);
        }
        self.finished.store(true, Ordering::Release);
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|s| s.clone())
    }

    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

pub struct RingWriter {
    producer: HeapProd<f32>,
    pub shared: Arc<RingShared>,
}

pub struct RingReader {
    consumer: HeapCons<f32>,
    pub shared: Arc<RingShared>,
}

/// A ring holding `capacity` mono samples.
pub fn audio_ring(capacity: usize) -> (RingWriter, RingReader) {
    let (producer, consumer) = HeapRb::<f32>::new(capacity.max(1)).split();
    let shared = Arc::new(RingShared::default());
    (
        RingWriter {
            producer,
            shared: shared.clone(),
        },
        RingReader { consumer, shared },
    )
}

impl RingWriter {
    /// Real-time write: stores what fits, counts the rest as dropped.
    /// Safe to call from an audio callback (no locks, no allocation).
    pub fn write_or_drop(&mut self, samples: &[f32]) {
        let written = self.producer.push_slice(samples);
        self.shared
            .written_samples
            .fetch_add(written as u64, Ordering::Relaxed);
        if written < samples.len() {
            self.shared
                .dropped_samples
                .fetch_add((samples.len() - written) as u64, Ordering::Relaxed);
            self.shared.overflow_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Non-real-time write (files, stdin): waits for room instead of
    /// dropping. Returns false if `stop` was raised while waiting.
    pub fn write_blocking(&mut self, mut samples: &[f32], stop: &AtomicBool) -> bool {
        while !samples.is_empty() {
            let n = self.producer.push_slice(samples);
            self.shared
                .written_samples
                .fetch_add(n as u64, Ordering::Relaxed);
            samples = &samples[n..];
            if n == 0 {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        true
    }

    pub fn finish(&self) {
        self.shared.finished.store(true, Ordering::Release);
    }
}

impl RingReader {
    /// Moves up to `out.len()` samples out of the ring; returns how many.
    pub fn read(&mut self, out: &mut [f32]) -> usize {
        self.consumer.pop_slice(out)
    }

    pub fn available(&self) -> usize {
        self.consumer.occupied_len()
    }

    /// True once the producer finished and everything was read.
    pub fn is_drained(&self) -> bool {
        self.shared.is_finished() && self.consumer.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_counted_not_hidden() {
        let (mut w, mut r) = audio_ring(100);
        w.write_or_drop(&[1.0; 80]);
        w.write_or_drop(&[2.0; 50]);
        assert_eq!(w.shared.dropped_samples.load(Ordering::Relaxed), 30);
        assert_eq!(w.shared.overflow_events.load(Ordering::Relaxed), 1);
        let mut buf = [0.0; 200];
        assert_eq!(r.read(&mut buf), 100);
        assert_eq!(&buf[78..82], &[1.0, 1.0, 2.0, 2.0]);
        assert!(!r.is_drained());
        w.finish();
        assert!(r.is_drained());
    }

    #[test]
    fn blocking_write_waits_for_the_reader() {
        let (mut w, mut r) = audio_ring(16);
        let stop = AtomicBool::new(false);
        let t = std::thread::spawn(move || {
            let data: Vec<f32> = (0..1000).map(|i| i as f32).collect();
            assert!(w.write_blocking(&data, &stop));
            w.finish();
        });
        let mut got = Vec::new();
        let mut buf = [0.0; 7];
        while !r.is_drained() {
            let n = r.read(&mut buf);
            got.extend_from_slice(&buf[..n]);
        }
        t.join().unwrap();
        assert_eq!(got, (0..1000).map(|i| i as f32).collect::<Vec<_>>());
    }
}
