//! # fer-cam
//!
//! Real-time facial emotion recognition with honest uncertainty. The model follows "A
//! Self-Supervised Diffusion Framework for Facial Emotion Recognition" (Hassan et al.): a ResNet18
//! encoder with CBAM attention in every block (pre-trained with Barlow Twins), a supervised
//! classifier f_φ, and a CARD diffusion head (Han et al., NeurIPS 2022) that samples label vectors
//! conditioned on the image and on f_φ(x). The spread of those samples gives each prediction its
//! certainty.
//!
//! ```text
//!  camera / file / stdin        face stage                 inference stage            emitter
//!  ┌────────────┐  frames  ┌──────────────────┐  crops  ┌───────────────────┐ preds ┌──────────┐
//!  │ capture    │─[2, drop │ detect (rustface)│─[bnd]──▶│ encoder (ResNet18 │─[bnd]▶│ JSON     │▶ stdout
//!  │ thread     │  oldest]▶│ crop 48x48 gray  │         │ +CBAM) + CARD     │       │ lines    │
//!  └────────────┘          │ track ids        │         │ sampler, batched  │       └──────────┘
//!                          └──────────────────┘         └───────────────────┘
//! ```
//!
//! Modules: [`data`] (FER2013 CSV and image folders, binary cache), [`model`] (networks, diffusion
//! maths, model directory format), [`infer`] ([`infer::Classifier`]), [`metrics`] and [`eval`].

pub mod alloc;
pub mod annotate;
pub mod calibrate;
pub mod capture;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod decode;
pub mod emit;
pub mod error;
pub mod eval;
pub mod face;
pub mod fsutil;
pub mod harness;
pub mod infer;
pub mod kernels;
pub mod log;
pub mod metrics;
pub mod model;
pub mod palette;
pub mod pipeline;
pub mod report;
pub mod rngs;
pub mod train;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use infer::{Classifier, FacePrediction};
