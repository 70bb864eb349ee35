//! Training of the pixel classifier (`crate::segment::pixels`) on folders of simulated cases,
//! each read through the DICOM reader and despeckled by the pipeline as a user's file would be.
//!
//! Deterministic: the pixels sampled, the initial weights and the batch order all come from
//! one seed, and training runs on one thread, so the same folders and seed give the same
//! weights bit for bit on one machine.

use std::path::PathBuf;

use serde::Serialize;

use super::evalset::{cases_in, truth_labels};
use super::phantom::Rng;
use super::Result;
use crate::label::Label;
use crate::segment::context;
use crate::segment::pixels::{self, Dense, PixelModel, CLASSES, FEATURES};
use crate::Pipeline;

/// Training settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TrainOptions {
    /// Seed of sampling, initialisation and batch order.
    pub seed: u64,
    /// Hidden layer widths.
    pub hidden: Vec<usize>,
    /// Passes over the samples.
    pub epochs: usize,
    /// Adam step size.
    pub learning_rate: f32,
    /// Samples per gradient step.
    pub batch: usize,
    /// Pixels drawn per frame from each label the truth has (stratified: rare structures such
    /// as vessels and nerves are seen as often as tissue).
    pub per_label: usize,
    /// Pixels drawn per frame from all valid pixels (the labels' natural frequencies).
    pub per_frame_random: usize,
    /// Frames read per cine (evenly spaced).
    pub frames_per_case: usize,
    /// Every n-th case is held out for validation (0: none).
    pub holdout_every: usize,
    /// L2 weight decay per step.
    pub weight_decay: f32,
    /// When set, the model trained is the second stage (`segment::context`) over this first
    /// stage's probabilities.
    pub first_stage: Option<PixelModel>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            seed: 2026,
            hidden: vec![32, 16],
            epochs: 12,
            learning_rate: 2e-3,
            batch: 256,
            per_label: 300,
            per_frame_random: 600,
            frames_per_case: 2,
            holdout_every: 8,
            weight_decay: 1e-5,
            first_stage: None,
        }
    }
}

/// Sampled pixels: features and labels.
#[derive(Debug, Default)]
pub struct Samples {
    /// Inputs per sample (`FEATURES`, or `context::INPUTS` for the second stage).
    pub dim: usize,
    /// `dim` values per sample.
    pub x: Vec<f32>,
    /// Label code per sample.
    pub y: Vec<u8>,
    /// Whether the sample's case is held out.
    pub held_out: Vec<bool>,
    /// Frames read.
    pub frames: usize,
}

/// What training reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Frames sampled.
    pub frames: usize,
    /// Training samples.
    pub train_samples: usize,
    /// Held-out samples.
    pub held_out_samples: usize,
    /// Mean cross-entropy on the training samples after each epoch.
    pub train_loss: Vec<f64>,
    /// Mean cross-entropy on the held-out samples after each epoch.
    pub held_out_loss: Vec<f64>,
    /// Held-out accuracy per label (share of its samples classified as it).
    pub held_out_recall: Vec<(String, f64)>,
}

/// An index below `n` (the phantom's seeded generator).
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// Reads every case of `dirs` and samples labelled pixels from its frames.
pub fn collect(pipeline: &Pipeline, dirs: &[PathBuf], opt: &TrainOptions) -> Result<Samples> {
    let mut rng = Rng::new(opt.seed ^ 0x5A5A);
    let mut s = Samples::default();
    let options = crate::dicom::ReadOptions::default();
    let mut case_index = 0usize;
    for dir in dirs {
        for (dcm, _truth) in cases_in(dir)? {
            let held = opt.holdout_every > 0 && case_index % opt.holdout_every == 0;
            case_index += 1;
            let file = crate::dicom::DicomFile::open(&dcm, &options)?;
            let count = file.frame_count();
            let take = opt.frames_per_case.clamp(1, count);
            for j in 0..take {
                let k = j * count / take;
                let frame = file.read_frame(k)?;
                let truth = truth_labels(&dcm, k)?;
                sample_frame(pipeline, &frame, &truth, held, opt, &mut rng, &mut s)?;
                s.frames += 1;
            }
        }
    }
    Ok(s)
}

fn sample_frame(
    pipeline: &Pipeline,
    frame: &crate::frame::Frame,
    truth: &ndarray::Array2<u8>,
    held: bool,
    opt: &TrainOptions,
    rng: &mut Rng,
    s: &mut Samples,
) -> Result<()> {
    // The features only: the classifier being trained is not run on them.
    let mut params = pipeline.config().segment.clone();
    params.learned = false;
    let params = &params;
    let despeckled = pipeline
        .despeckler()
        .run(&frame.intensity, &pipeline.config().filters)?;
    let f = crate::segment::features_cpu(frame, &despeckled, params)?;
    if frame.calibration.mm_per_px().is_none() {
        return Ok(());
    }
    let (h, w) = f.intensity.dim();
    let n = h * w;
    let room = if opt.first_stage.is_some() {
        context::CONTEXT
    } else {
        0
    };
    let mut feats = pixels::pixel_features_with_room(&f, room);
    if let Some(first) = &opt.first_stage {
        let probs = pixels::pixel_mlp::cpu(first, &feats, &f.valid);
        feats = context::context_features(&f, feats, &probs);
    }
    let dim = feats.len() / n.max(1);
    s.dim = dim;
    let b = frame.region.bounds;
    let label_at = |i: usize| -> Option<u8> {
        let (y, x) = (i / w, i % w);
        if !f.valid[[y, x]] {
            return None;
        }
        truth
            .get((b.y0 + y * f.step, b.x0 + x * f.step))
            .copied()
            .filter(|&l| Label::from_code(l).is_some())
    };
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); CLASSES];
    let mut all = Vec::new();
    for i in 0..n {
        if let Some(l) = label_at(i) {
            by_label[l as usize].push(i);
            all.push(i);
        }
    }
    let mut push = |i: usize, l: u8| {
        s.x.extend((0..dim).map(|k| feats[k * n + i]));
        s.y.push(l);
        s.held_out.push(held);
    };
    for (l, idx) in by_label.iter().enumerate() {
        for _ in 0..opt.per_label.min(idx.len()) {
            push(idx[below(rng, idx.len())], l as u8);
        }
    }
    for _ in 0..opt.per_frame_random.min(all.len()) {
        let i = all[below(rng, all.len())];
        push(i, label_at(i).unwrap_or(0));
    }
    Ok(())
}

/// Adam's first and second moments of one layer's weights, then of its biases.
type AdamState = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// Trains a model on `s`.
pub fn train(s: &Samples, opt: &TrainOptions) -> (PixelModel, TrainReport) {
    let n = s.y.len();
    let train: Vec<usize> = (0..n).filter(|&i| !s.held_out[i]).collect();
    let held: Vec<usize> = (0..n).filter(|&i| s.held_out[i]).collect();
    let dim = s.dim;
    // Standardisation from the training samples.
    let mut mean = vec![0f64; dim];
    let mut sq = vec![0f64; dim];
    for &i in &train {
        for k in 0..dim {
            let v = s.x[i * dim + k] as f64;
            mean[k] += v;
            sq[k] += v * v;
        }
    }
    let count = train.len().max(1) as f64;
    let mean: Vec<f32> = mean.iter().map(|m| (m / count) as f32).collect();
    let scale: Vec<f32> = sq
        .iter()
        .zip(&mean)
        .map(|(q, m)| {
            let var = q / count - (*m as f64) * (*m as f64);
            (1.0 / var.max(1e-8).sqrt()) as f32
        })
        .collect();
    let mut rng = Rng::new(opt.seed);
    let mut widths = vec![dim];
    widths.extend(&opt.hidden);
    widths.push(CLASSES);
    let mut layers: Vec<Dense> = widths
        .windows(2)
        .map(|io| {
            let (i, o) = (io[0], io[1]);
            let sd = (2.0 / i as f32).sqrt();
            Dense {
                inputs: i,
                outputs: o,
                w: (0..i * o).map(|_| rng.normal() as f32 * sd).collect(),
                b: vec![0.0; o],
            }
        })
        .collect();
    let mut adam: Vec<AdamState> = layers
        .iter()
        .map(|l| {
            (
                vec![0.0; l.w.len()],
                vec![0.0; l.w.len()],
                vec![0.0; l.b.len()],
                vec![0.0; l.b.len()],
            )
        })
        .collect();
    let standardised = |i: usize| -> Vec<f32> {
        (0..dim)
            .map(|k| (s.x[i * dim + k] - mean[k]) * scale[k])
            .collect()
    };
    let mut report = TrainReport {
        frames: s.frames,
        train_samples: train.len(),
        held_out_samples: held.len(),
        train_loss: Vec::new(),
        held_out_loss: Vec::new(),
        held_out_recall: Vec::new(),
    };
    let mut order = train.clone();
    let mut step = 0i32;
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    for epoch in 0..opt.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, below(&mut rng, i + 1));
        }
        // Cosine decay of the step size over the run.
        let lr = opt.learning_rate
            * 0.5
            * (1.0 + (std::f32::consts::PI * epoch as f32 / opt.epochs as f32).cos());
        for batch in order.chunks(opt.batch) {
            let mut grads: Vec<(Vec<f32>, Vec<f32>)> = layers
                .iter()
                .map(|l| (vec![0.0; l.w.len()], vec![0.0; l.b.len()]))
                .collect();
            for &i in batch {
                backprop(&layers, &standardised(i), s.y[i] as usize, &mut grads);
            }
            step += 1;
            let inv = 1.0 / batch.len() as f32;
            for ((l, g), a) in layers.iter_mut().zip(&grads).zip(&mut adam) {
                let c1 = 1.0 - b1.powi(step);
                let c2 = 1.0 - b2.powi(step);
                for (j, w) in l.w.iter_mut().enumerate() {
                    let gj = g.0[j] * inv + opt.weight_decay * *w;
                    a.0[j] = b1 * a.0[j] + (1.0 - b1) * gj;
                    a.1[j] = b2 * a.1[j] + (1.0 - b2) * gj * gj;
                    *w -= lr * (a.0[j] / c1) / ((a.1[j] / c2).sqrt() + eps);
                }
                for (j, bias) in l.b.iter_mut().enumerate() {
                    let gj = g.1[j] * inv;
                    a.2[j] = b1 * a.2[j] + (1.0 - b1) * gj;
                    a.3[j] = b2 * a.3[j] + (1.0 - b2) * gj * gj;
                    *bias -= lr * (a.2[j] / c1) / ((a.3[j] / c2).sqrt() + eps);
                }
            }
        }
        let loss = |set: &[usize]| -> f64 {
            let total: f64 = set
                .iter()
                .map(|&i| {
                    let p = forward_probs(&layers, &standardised(i));
                    -(p[s.y[i] as usize].max(1e-9) as f64).ln()
                })
                .sum();
            total / set.len().max(1) as f64
        };
        report.train_loss.push(loss(&train));
        report.held_out_loss.push(loss(&held));
        log::info!(
            "epoch {}: train loss {:.4}, held-out loss {:.4}",
            epoch + 1,
            report.train_loss[epoch],
            report.held_out_loss[epoch]
        );
    }
    for l in Label::ALL {
        let of: Vec<usize> = held
            .iter()
            .copied()
            .filter(|&i| s.y[i] == l.code())
            .collect();
        let hit = of
            .iter()
            .filter(|&&i| {
                let p = forward_probs(&layers, &standardised(i));
                argmax(&p) == l.code() as usize
            })
            .count();
        report
            .held_out_recall
            .push((l.name().to_string(), hit as f64 / of.len().max(1) as f64));
    }
    let model = PixelModel {
        version: 1,
        features: if dim == FEATURES {
            pixels::FEATURE_NAMES.to_vec()
        } else {
            context::input_names()
        }
        .iter()
        .map(|s| s.to_string())
        .collect(),
        classes: Label::ALL.iter().map(|l| l.name().to_string()).collect(),
        mean,
        scale,
        layers,
        provenance: serde_json::Value::Null,
    };
    (model, report)
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, v)| if *v > a.1 { (i, *v) } else { a },
        )
        .0
}

/// Activations of every layer (after ReLU; the last is the logits).
fn activations(layers: &[Dense], x: &[f32]) -> Vec<Vec<f32>> {
    let mut acts = vec![x.to_vec()];
    let last = layers.len() - 1;
    for (li, l) in layers.iter().enumerate() {
        let a = &acts[acts.len() - 1];
        let out: Vec<f32> = (0..l.outputs)
            .map(|o| {
                let s = l.b[o]
                    + l.w[o * l.inputs..(o + 1) * l.inputs]
                        .iter()
                        .zip(a)
                        .map(|(w, v)| w * v)
                        .sum::<f32>();
                if li < last {
                    s.max(0.0)
                } else {
                    s
                }
            })
            .collect();
        acts.push(out);
    }
    acts
}

fn softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

fn forward_probs(layers: &[Dense], x: &[f32]) -> Vec<f32> {
    let acts = activations(layers, x);
    softmax(&acts[acts.len() - 1])
}

/// Adds the cross-entropy gradient of one sample to `grads`.
fn backprop(layers: &[Dense], x: &[f32], y: usize, grads: &mut [(Vec<f32>, Vec<f32>)]) {
    let acts = activations(layers, x);
    let mut delta = softmax(&acts[acts.len() - 1]);
    delta[y] -= 1.0;
    for li in (0..layers.len()).rev() {
        let l = &layers[li];
        let input = &acts[li];
        let (gw, gb) = &mut grads[li];
        for o in 0..l.outputs {
            let d = delta[o];
            if d == 0.0 {
                continue;
            }
            gb[o] += d;
            for (g, v) in gw[o * l.inputs..(o + 1) * l.inputs].iter_mut().zip(input) {
                *g += d * v;
            }
        }
        if li > 0 {
            let mut prev = vec![0f32; l.inputs];
            for o in 0..l.outputs {
                let d = delta[o];
                for (p, w) in prev.iter_mut().zip(&l.w[o * l.inputs..(o + 1) * l.inputs]) {
                    *p += d * w;
                }
            }
            // ReLU of the layer beneath.
            for (p, a) in prev.iter_mut().zip(input) {
                if *a <= 0.0 {
                    *p = 0.0;
                }
            }
            delta = prev;
        }
    }
}
