//! Log-mel on the GPU: one block per STFT frame computes the windowed 400-point DFT
//! against a twiddle table (a direct sum: 201 bins × 400 samples per frame is tiny next
//! to what the GPU does per microsecond, and it needs no FFT library), the power
//! spectrum, the sparse Slaney filterbank, log10 and the block's maximum; a second
//! launch applies the (global max − 8) floor and the (x + 4) / 4 scaling. The tables
//! are the CPU frontend's (same window formula; the filterbank is handed in by the
//! model), uploaded once.

use super::func;
use crate::ops::fast::{
    DEVICE_MEL_BINS as N_FREQ, DEVICE_MEL_HOP as HOP_LENGTH, DEVICE_MEL_N_FFT as N_FFT,
};
use candle_core::cuda::cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{Result, Storage, Tensor};

pub(crate) struct CudaMel {
    dev: CudaDevice,
    n_mels: usize,
    window: CudaSlice<f32>,
    twiddle: CudaSlice<f32>,
    fb_first: CudaSlice<i32>,
    fb_len: CudaSlice<i32>,
    fb_off: CudaSlice<i32>,
    fb_w: CudaSlice<f32>,
}

impl CudaMel {
    /// `dense` is the mel filterbank `[n_mels, N_FREQ]`, row-major.
    pub fn new(dense: &[f32], n_mels: usize, dev: &CudaDevice) -> Result<Self> {
        // Periodic Hann window and twiddles computed in f64 and rounded once, like the
        // CPU frontend's window.
        let window: Vec<f32> = (0..N_FFT)
            .map(|n| {
                let ph = 2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64;
                (0.5 - 0.5 * ph.cos()) as f32
            })
            .collect();
        let mut twiddle = Vec::with_capacity(2 * N_FFT);
        for j in 0..N_FFT {
            twiddle.push((2.0 * std::f64::consts::PI * j as f64 / N_FFT as f64).cos() as f32);
        }
        for j in 0..N_FFT {
            // the sign of the imaginary part does not matter for the power
            twiddle.push((2.0 * std::f64::consts::PI * j as f64 / N_FFT as f64).sin() as f32);
        }
        let (mut first, mut len, mut off, mut w) = (vec![], vec![], vec![], vec![]);
        for m in 0..n_mels {
            let row = &dense[m * N_FREQ..(m + 1) * N_FREQ];
            let a = row.iter().position(|&x| x != 0.0).unwrap_or(0);
            let b = row.iter().rposition(|&x| x != 0.0).unwrap_or(0).max(a);
            first.push(a as i32);
            len.push((b + 1 - a) as i32);
            off.push(w.len() as i32);
            w.extend_from_slice(&row[a..=b]);
        }
        Ok(Self {
            dev: dev.clone(),
            n_mels,
            window: dev.clone_htod(&window)?,
            twiddle: dev.clone_htod(&twiddle)?,
            fb_first: dev.clone_htod(&first)?,
            fb_len: dev.clone_htod(&len)?,
            fb_off: dev.clone_htod(&off)?,
            fb_w: dev.clone_htod(&w)?,
        })
    }

    pub(crate) fn compute(&self, audio: &[f32], tail_zeros: usize) -> Result<Tensor> {
        let dev_audio = self.dev.clone_htod(audio)?;
        self.run(&dev_audio, 0, audio.len(), tail_zeros)
    }

    pub(crate) fn compute_tensor(&self, audio: &Tensor, tail_zeros: usize) -> Result<Tensor> {
        let audio = audio
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .contiguous()?;
        let n = audio.dim(0)?;
        let (storage, layout) = audio.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("device log-mel: audio is not on the GPU")
        };
        self.run(
            cs.as_cuda_slice::<f32>()?,
            layout.start_offset(),
            n,
            tail_zeros,
        )
    }

    fn run(
        &self,
        audio: &CudaSlice<f32>,
        offset: usize,
        n_audio: usize,
        tail_zeros: usize,
    ) -> Result<Tensor> {
        let n_frames = (n_audio + tail_zeros) / HOP_LENGTH;
        if n_frames == 0 || n_audio == 0 {
            candle_core::bail!("device log-mel: {n_audio} samples make no frame");
        }
        let n = self.n_mels * n_frames;
        let stream = self.dev.cuda_stream();
        // SAFETY: every element is written by `logmel_frames` (all mels of all frames).
        let out = unsafe { self.dev.alloc::<f32>(n)? };
        let gmax = self.dev.clone_htod(&[i32::MIN])?;
        let audio_ptr = audio.device_ptr(&stream).0 + 4 * offset as u64;
        let out_ptr = out.device_ptr(&stream).0;
        let gmax_ptr = gmax.device_ptr(&stream).0;
        let (n_audio_i, tail_i, n_mels_i, n_frames_i) = (
            n_audio as i32,
            tail_zeros as i32,
            self.n_mels as i32,
            n_frames as i32,
        );
        let ptr = |s: &CudaSlice<f32>| s.device_ptr(&stream).0;
        let ptr_i = |s: &CudaSlice<i32>| s.device_ptr(&stream).0;
        let (window, twiddle, fb_w) = (ptr(&self.window), ptr(&self.twiddle), ptr(&self.fb_w));
        let (fb_first, fb_len, fb_off) = (
            ptr_i(&self.fb_first),
            ptr_i(&self.fb_len),
            ptr_i(&self.fb_off),
        );
        let f = func(&self.dev, "logmel_frames")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&audio_ptr)
            .arg(&n_audio_i)
            .arg(&tail_i)
            .arg(&window)
            .arg(&twiddle)
            .arg(&fb_first)
            .arg(&fb_len)
            .arg(&fb_off)
            .arg(&fb_w)
            .arg(&n_mels_i)
            .arg(&n_frames_i)
            .arg(&out_ptr)
            .arg(&gmax_ptr);
        let cfg = LaunchConfig {
            grid_dim: (n_frames as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: buffers sized above; the kernel reads audio[0..n_audio] only.
        unsafe { b.launch(cfg) }.w()?;

        let f = func(&self.dev, "logmel_normalize")?;
        let n_i = n as i32;
        let null = 0u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&out_ptr).arg(&n_i).arg(&gmax_ptr).arg(&null);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(1024) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: n elements of `out`.
        unsafe { b.launch(cfg) }.w()?;
        drop(gmax);
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            (self.n_mels, n_frames),
            BackpropOp::none(),
            false,
        ))
    }
}
