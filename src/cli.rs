//! Command-line interface: argument parsing only; the work is done by the library.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use fer_cam::config::{Stem, Tta};
use fer_cam::kernels::precision::Precision;
use fer_cam::train::{DistillConfig, TrainConfig};

#[derive(Debug, Parser)]
#[command(
    name = "fer-cam",
    version,
    about = "Facial emotion recognition with calibrated uncertainty (ResNet18+CBAM, Barlow Twins, CARD)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a freshly initialised (untrained) model directory.
    Init(InitArgs),
    /// Score a model on a labelled split: accuracy, PAvPU, recall, confusion, ECE, NLL.
    Eval(EvalArgs),
    /// Load a dataset (through the cache) and print its splits, classes and load time.
    Data(DataArgs),
    /// Train: Barlow Twins (ssl) → supervised f_phi (classifier) → CARD head (card), or all.
    Train(TrainArgs),
    /// The real-time daemon: frames in, one JSON line per processed frame out.
    Run(RunArgs),
    /// List cameras and their formats.
    Devices,
    /// Fit the CARD sampler's temperature on a labelled split (PublicTest) by NLL; write the
    /// calibration JSON and its reliability diagram (SVG).
    Calibrate(CalibrateArgs),
    /// Write a model directory for shipping: f16 weights and the sampler temperatures of each
    /// calibration given.
    Export(ExportArgs),
    /// Average the weights of models fine-tuned one from another (a model soup) into a new
    /// model directory, to train a CARD head on and check on held-out data.
    Average(AverageArgs),
    /// Turn a recorded run (the JSON lines of `run`) into timelines, emotion shares, gaps and
    /// latency plots on one HTML page, plus a CSV with one row per face per frame.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The JSON lines of a `fer-cam run` (schema v1); `-` or nothing reads stdin.
    pub input: Option<PathBuf>,
    /// Directory to write (new, or empty): index.html, faces.csv, summary.json and SVG plots.
    #[arg(long)]
    pub out: PathBuf,
}

/// The model and how it classifies: shared by `run`, `eval` and `calibrate`.
#[derive(Debug, Args)]
pub struct ClassifierArgs {
    /// A built-in model by name, `fer2013` (FER2013's seven classes) or `ferplus` (FER+'s
    /// eight, trained on the crowd's votes), or a model directory (config.json +
    /// model.safetensors) [default: fer2013].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// CARD samples per face [default: the model's].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Sampling steps, a strided subset of the training timesteps [default: the model's].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Seed of the sampler's noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute device: cpu, cuda or cuda:N (GPU N; needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Inference weights of the layers on maps of at most 4x4: f16 (half the memory traffic;
    /// products and sums stay f32) or f32 (as trained).
    #[arg(long, value_enum, default_value = "f16")]
    pub weights: StoredWeightsArg,
    /// CARD sampler code: fused (one CPU kernel) or candle (the reference, op by op).
    #[arg(long, value_enum, default_value = "fused")]
    pub sampler_kernel: SamplerKernelArg,
    /// Test-time views per face: none, flip (the crop and its mirror) or ten-crop (corner and
    /// centre 44-px crops and their mirrors) [default: the model's, which its temperatures were
    /// calibrated under].
    #[arg(long, value_enum)]
    pub tta: Option<TtaArg>,
}

/// `--tta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TtaArg {
    None,
    Flip,
    TenCrop,
}

impl From<TtaArg> for Tta {
    fn from(t: TtaArg) -> Self {
        match t {
            TtaArg::None => Tta::None,
            TtaArg::Flip => Tta::Flip,
            TtaArg::TenCrop => Tta::TenCrop,
        }
    }
}

impl From<Tta> for TtaArg {
    fn from(t: Tta) -> Self {
        match t {
            Tta::None => TtaArg::None,
            Tta::Flip => TtaArg::Flip,
            Tta::TenCrop => TtaArg::TenCrop,
        }
    }
}

/// `--sampler-kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplerKernelArg {
    Fused,
    Candle,
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub classifier: ClassifierArgs,
    #[command(flatten)]
    pub source: DataSource,
    /// Split to fit on. Fit on PublicTest and report on PrivateTest.
    #[arg(long, default_value = "PublicTest")]
    pub split: String,
    /// Crops per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Bins of the ECE and the reliability diagram.
    #[arg(long, default_value_t = 15)]
    pub bins: usize,
    /// Calibration JSON to write (a new file); the diagram goes beside it as .svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file (and its .svg).
    #[arg(long)]
    pub force: bool,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl CalibrateArgs {
    /// `fer-cam calibrate --data DATA --out OUT` with every other option at the command's own
    /// default, parsed as the command line would be (for `train all`'s ship steps).
    pub fn with_defaults(data: &Path, out: &Path) -> Result<Self, clap::Error> {
        let flag = |name: &str, value: &Path| {
            let mut f = std::ffi::OsString::from(name);
            f.push(value);
            f
        };
        let argv = [
            "fer-cam".into(),
            "calibrate".into(),
            flag("--data=", data),
            flag("--out=", out),
        ];
        match Cli::try_parse_from(argv)?.command {
            Command::Calibrate(a) => Ok(a),
            _ => unreachable!("the subcommand parsed is calibrate"),
        }
    }
}

#[derive(Debug, Args)]
pub struct AverageArgs {
    /// A model directory to average (at least two, of one architecture, fine-tuned one from
    /// another: e.g. RUN/classifier/model of consecutive training cycles).
    #[arg(long, required = true, num_args = 1)]
    pub model: Vec<PathBuf>,
    /// New model directory to write (never replaces an existing path).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Trained model directory (e.g. RUN/card/model).
    #[arg(long)]
    pub model: PathBuf,
    /// New model directory to write (never replaces an existing path).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage of the convolution and linear weights.
    #[arg(long, value_enum, default_value = "f16")]
    pub weights: StoredWeightsArg,
    /// Take the sampler temperatures from this calibration file (written by `calibrate`).
    /// Repeat it for calibrations under other test-time views: the first sets the model's
    /// default views, the others are used when `--tta` picks theirs.
    #[arg(long)]
    pub calibration: Vec<PathBuf>,
}

/// `--weights` of `export` (storage) and of `run` / `eval` / `calibrate` (inference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoredWeightsArg {
    F16,
    F32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub classifier: ClassifierArgs,
    /// Input: a video file (mp4, webm, mkv, mov, ...; decoded by ffmpeg), a .y4m file, `-` for
    /// YUV4MPEG2 on stdin, or image files / directories (sorted). Every frame is processed.
    #[arg(long, num_args = 1.., conflicts_with = "camera")]
    pub input: Vec<PathBuf>,
    /// Treat `--input -` or a pipe as a live feed, like a camera: when the pipeline is busy the
    /// stalest frame is dropped (counted and reported) instead of making the writer wait.
    #[arg(long)]
    pub live: bool,
    /// The stills are frames of one scene (e.g. extracted video frames): track ids and
    /// `--smooth` carry from one to the next. By default each still stands alone.
    #[arg(long)]
    pub sequence: bool,
    /// Camera index (needs a build with the `camera` feature).
    #[arg(long)]
    pub camera: Option<u32>,
    /// Camera resolution, e.g. 640x480.
    #[arg(long, default_value = "640x480")]
    pub resolution: String,
    /// Camera frame rate.
    #[arg(long, default_value_t = 30)]
    pub fps: u32,
    /// Pace file input at its frame rate (default: as fast as possible).
    #[arg(long)]
    pub realtime: bool,
    /// Process at most this many frames per second [default: 10 for cameras, no limit for
    /// files and stdin]. 0 = no limit.
    #[arg(long, allow_negative_numbers = true)]
    pub max_fps: Option<f64>,
    #[command(flatten)]
    pub face: FaceArgs,
    /// Most faces classified per frame: the largest are kept, the others counted in the
    /// summary and said on stderr.
    #[arg(long, default_value_t = fer_cam::pipeline::DEFAULT_MAX_FACES)]
    pub max_faces: usize,
    /// Per-track smoothing: weight of the newest probabilities (1 = off).
    #[arg(allow_negative_numbers = true, long, default_value_t = 1.0)]
    pub smooth: f32,
    /// Seconds between status lines (0: none).
    #[arg(allow_negative_numbers = true, long, default_value_t = 5.0)]
    pub status_every: f64,
    /// Print a latency / fps / drops summary to stderr at exit.
    #[arg(long)]
    pub stats: bool,
    /// Also write every processed frame with boxes, track ids, labels and probability bars
    /// (dashed box: uncertain) as YUV4MPEG2: a new file, a FIFO, or `>(ffplay -i -)` for a live
    /// preview. For stills, a folder (`DIR/`) gets one PNG per photo at its own size. Never
    /// replaces an existing file. JSON on stdout is unchanged.
    #[arg(long, value_name = "PATH")]
    pub annotate: Option<PathBuf>,
}

/// The face stage's settings, shared by `run` and `eval --through-pipeline`.
#[derive(Debug, Args)]
pub struct FaceArgs {
    /// Downscale full frames to this width for detection (0: never) [default: 320 for video,
    /// 0 for stills].
    #[arg(long)]
    pub detect_width: Option<u32>,
    /// Full-frame detection every N frames; in between only around known faces.
    #[arg(long, default_value_t = 3)]
    pub detect_every: u32,
    /// Smallest face side searched (detector pixels).
    #[arg(long, default_value_t = 20)]
    pub min_face: u32,
    /// Network that searches around known faces between full-frame searches: blazeface
    /// (MediaPipe BlazeFace, short range) or rustface.
    #[arg(long, default_value = "blazeface")]
    pub detector: String,
    /// What searches whole frames: both (BlazeFace on tiles at a few scales for faces of 40
    /// frame pixels and up, plus rustface), blazeface or rustface.
    #[arg(long, default_value = "both")]
    pub full_detector: String,
    /// Detector score threshold.
    #[arg(allow_negative_numbers = true, long, default_value_t = 2.0)]
    pub det_threshold: f64,
    /// Crop margin around the face box (fraction of its side, each side). The default frames
    /// faces as FER2013's images are (`eval --through-pipeline`: crop side 0.95 of the true
    /// square, and the best accuracy of the margins measured).
    #[arg(allow_negative_numbers = true, long, default_value_t = fer_cam::pipeline::DEFAULT_MARGIN)]
    pub margin: f32,
}

/// How `eval --through-pipeline` renders each test image into a frame (every draw seeded by
/// `--render-seed` and the image's index).
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Seed of every render draw.
    #[arg(long, default_value_t = 0)]
    pub render_seed: u64,
    /// Frame size, e.g. 640x480.
    #[arg(long, default_value = "640x480")]
    pub render_frame: String,
    /// Face side in frame pixels, MIN-MAX (uniform).
    #[arg(long, default_value = "64-256")]
    pub render_face: String,
    /// In-plane rotation, uniform in ±DEG.
    #[arg(long, default_value_t = 10.0)]
    pub render_roll: f32,
    /// Lighting gain range LO-HI.
    #[arg(long, default_value = "0.7-1.3")]
    pub render_gain: String,
    /// Lighting gamma range LO-HI.
    #[arg(long, default_value = "0.8-1.25")]
    pub render_gamma: String,
    /// Share of frames downscaled (a lower-resolution webcam) and scaled back.
    #[arg(long, default_value_t = 0.3)]
    pub render_downscale_p: f32,
    /// Smallest downscaling factor.
    #[arg(long, default_value_t = 0.5)]
    pub render_downscale_min: f32,
    /// Largest Gaussian blur sigma (pixels).
    #[arg(long, default_value_t = 1.0)]
    pub render_blur: f32,
    /// Largest sensor-noise standard deviation (gray levels).
    #[arg(long, default_value_t = 4.0)]
    pub render_noise: f32,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TrainStage {
    Ssl,
    Classifier,
    Card,
    All,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Stage(s) to run.
    #[arg(value_enum)]
    pub stage: TrainStage,
    #[command(flatten)]
    pub source: DataSource,
    /// Run directory: config, metrics.jsonl, and per stage a model directory and a checkpoint.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// A full training config (JSON, as written to RUN/config.json); flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from the stage checkpoints in --run-dir.
    #[arg(long)]
    pub resume: bool,
    /// Model directory to start from (classifier: an SSL model; card: a trained classifier).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Distil the classifier from this model directory's f_φ (its views and share of the
    /// target from the config's `classifier.distill`, else ten-crop and 0.6); given more than
    /// once, from the mean of the models' probabilities.
    #[arg(long, value_name = "DIR")]
    pub teacher: Vec<PathBuf>,
    /// Train the classifier from random weights (ablation: no SSL); `all` then skips ssl.
    #[arg(long)]
    pub from_scratch: bool,
    /// Encoder stem: conv3x3, conv3x3_s2 or conv7x7_pool.
    #[arg(long)]
    pub stem: Option<String>,
    /// Encoder without CBAM (ablation).
    #[arg(long)]
    pub no_cbam: bool,
    #[arg(long)]
    pub ssl_epochs: Option<usize>,
    #[arg(long)]
    pub classifier_epochs: Option<usize>,
    #[arg(long)]
    pub card_epochs: Option<usize>,
    /// Batch size of the ssl and classifier stages.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate of the ssl and classifier stages.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Use only the first N Training images.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use only the first N PublicTest images for validation.
    #[arg(long)]
    pub val_limit: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Compute device: cpu, cuda or cuda:N (GPU N; needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Operands of the training convolutions' Winograd GEMMs: f32 (the default) or bf16 (f32
    /// sums; on CPUs with AVX512-BF16, else f32)
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub precision: Option<String>,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// Sets the data, the run directory and every flag given on the command line in `cfg` (a
    /// `--config` file or the defaults); flags win over the file.
    pub fn apply_to(
        &self,
        cfg: &mut TrainConfig,
        cache_dir: Option<PathBuf>,
    ) -> anyhow::Result<()> {
        cfg.data = self.source.data.clone();
        cfg.run_dir = self.run_dir.clone();
        match (&self.source.labels, &cfg.labels) {
            (Some(l), _) => {
                cfg.labels = Some(l.clone());
                cfg.labels_unverified = self.source.labels_unverified;
            }
            (None, Some(_)) => anyhow::bail!(
                "this recipe trains on FER+ votes: pass --labels ferplus_labels.csv (the FER+ \
                 vote file of the --data rows)"
            ),
            (None, None) => {}
        }
        cfg.cache_dir = cache_dir;
        if let Some(s) = &self.stem {
            cfg.model.encoder.stem = s.parse::<Stem>()?;
        }
        if self.no_cbam {
            cfg.model.encoder.cbam = false;
        }
        if let Some(n) = self.ssl_epochs {
            cfg.ssl.opt.epochs = n;
        }
        if let Some(n) = self.classifier_epochs {
            cfg.classifier.opt.epochs = n;
        }
        if let Some(n) = self.card_epochs {
            cfg.card.epochs = n;
        }
        if let Some((dir, also)) = self.teacher.split_first() {
            let d = cfg
                .classifier
                .distill
                .get_or_insert_with(|| DistillConfig::new(dir.clone()));
            d.teacher = dir.clone();
            d.also = also.to_vec();
        }
        if let Some(b) = self.batch_size {
            cfg.ssl.opt.batch_size = b;
            cfg.classifier.opt.batch_size = b;
        }
        if let Some(lr) = self.lr {
            cfg.ssl.opt.lr = lr;
            cfg.classifier.opt.lr = lr;
        }
        if self.train_limit.is_some() {
            cfg.train_limit = self.train_limit;
        }
        if self.val_limit.is_some() {
            cfg.val_limit = self.val_limit;
        }
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        if let Some(p) = &self.precision {
            cfg.precision = p.parse::<Precision>()?;
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct DataSource {
    /// FER2013 CSV (plain or .gz) or an image-folder root (<root>/<split>/<class>/*.png).
    #[arg(long)]
    pub data: PathBuf,
    /// Do not read or write the binary dataset cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Cache directory [default: $FER_CAM_CACHE, $XDG_CACHE_HOME/fer-cam or ~/.cache/fer-cam].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// FER+ crowd votes for the same rows (fer2013new.csv / ferplus_labels.csv): label each
    /// image with its majority over FER+'s eight classes, leaving out rows whose majority is
    /// "unknown", "not a face" or shared (`eval` also scores apart the rows that pass Barsoum et
    /// al.'s stricter majority rule).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Accept a --labels file whose sha256 is not FER+'s.
    #[arg(long, requires = "labels")]
    pub labels_unverified: bool,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Encoder stem: conv3x3 (accurate), conv3x3_s2 or conv7x7_pool (fast).
    #[arg(long, default_value = "conv3x3")]
    pub stem: String,
    /// Build the encoder without CBAM attention.
    #[arg(long)]
    pub no_cbam: bool,
    /// Comma-separated class names in output order [default: FER2013's seven].
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// CARD training timesteps T.
    #[arg(long)]
    pub timesteps: Option<usize>,
    /// Seed of the weight initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace an existing directory.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub classifier: ClassifierArgs,
    #[command(flatten)]
    pub source: DataSource,
    /// Split to score (Training, PublicTest, PrivateTest or a folder name).
    #[arg(long, default_value = "PrivateTest")]
    pub split: String,
    /// Crops per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Confidence threshold of the paper's PAvPU variant.
    #[arg(allow_negative_numbers = true, long, default_value_t = 0.5)]
    pub threshold: f32,
    /// Score only the first N images of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Render each image into a camera-like frame and score it through `run`'s own face stage
    /// (detection, crop) as well as on its own crop: faces found, accuracy over all and over
    /// found faces, crop framing (the --render-* and face-stage options below).
    #[arg(long)]
    pub through_pipeline: bool,
    #[command(flatten)]
    pub render: RenderArgs,
    #[command(flatten)]
    pub face: FaceArgs,
}

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(flatten)]
    pub source: DataSource,
}
