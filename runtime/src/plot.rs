//! `vpmoe-rt plot RUN_DIR`: a run's `metrics.jsonl` drawn as one self-contained HTML page of SVG
//! panels (plotters' SVG backend): the losses with the held-out and canary points, the greedy
//! answers' Harmony validity at evaluations, the learning rate, the
//! gradient norm and clipping, throughput, router health and a per-layer expert-load heatmap, and
//! stage 2's weights and stage 3's signals when the run has them.

use anyhow::{bail, ensure, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;

/// One panel: its title and its SVG.
pub struct Panel {
    pub title: String,
    pub svg: String,
}

/// A named line over steps.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    /// Drawn as points rather than a line (sparse evaluations).
    dots: bool,
}

const SIZE: (u32, u32) = (720, 340);

/// Line colours, distinct on white and for the common colour-vision deficiencies (Okabe–Ito).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
];

/// The records of `RUN_DIR/metrics.jsonl`, each checked to be a step record.
pub fn read_metrics(run: &Path) -> Result<Vec<Value>> {
    let path = run.join("metrics.jsonl");
    ensure!(path.is_file(), "{}: no metrics.jsonl (is it the --ckpt-dir of a `vpmoe-rt train` run?)", run.display());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{at}: not JSON"))?;
        ensure!(v["step"].as_u64().is_some() && v["loss"].is_number(), "{at}: not a step record (no step or loss)");
        out.push(v);
    }
    if out.is_empty() {
        bail!("{}: the run has no steps yet", path.display());
    }
    Ok(out)
}

fn series(records: &[Value], name: &str, f: impl Fn(&Value) -> Option<f64>) -> Series {
    let points =
        records.iter().filter_map(|r| Some((r["step"].as_f64()?, f(r)?))).filter(|p| p.1.is_finite()).collect();
    Series { name: name.into(), points, dots: false }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Every panel the records have data for.
pub fn panels(records: &[Value]) -> Result<Vec<Panel>> {
    let s = |name: &str, f: &dyn Fn(&Value) -> Option<f64>| series(records, name, f);
    let mut out = Vec::new();
    let dots = |mut x: Series| {
        x.dots = true;
        x
    };
    out.push(lines(
        "Loss",
        "loss (nats)",
        vec![
            s("objective", &|r| num(&r["loss"])),
            s("CE reasoning", &|r| num(&r["ce_reasoning"])),
            s("CE final", &|r| num(&r["ce_final"])),
            dots(s("held-out", &|r| num(&r["eval"]["loss"]))),
            dots(s("canary", &|r| num(&r["eval"]["canary_loss"]))),
        ],
    )?);
    if records.iter().any(|r| r["eval"]["valid_rate"].is_number()) {
        out.push(lines(
            "Evaluation: Harmony validity of greedy answers",
            "share",
            vec![dots(s("valid", &|r| num(&r["eval"]["valid_rate"])))],
        )?);
    }
    out.push(lines("Learning rate", "lr", vec![s("Normuon lr", &|r| num(&r["lr"]))])?);
    out.push(lines(
        "Gradient norm and clipping",
        "norm / share",
        vec![
            s("grad norm", &|r| num(&r["grad_norm"])),
            s("clipped (1 − clip coefficient)", &|r| num(&r["clip_coef"]).map(|c| 1.0 - c)),
        ],
    )?);
    out.push(lines("Throughput", "tokens/s", vec![s("tokens/s", &|r| num(&r["tokens_per_s"]))])?);
    if records.iter().any(|r| r["router"].is_object()) {
        out.push(lines(
            "Router health",
            "value",
            vec![
                s("aux loss (1 = balanced)", &|r| num(&r["router"]["aux"])),
                s("load CV", &|r| num(&r["router"]["cv"])),
                s("load entropy / ln E", &|r| num(&r["router"]["entropy"])),
                s("busiest expert share", &|r| num(&r["router"]["max_load_pct"]).map(|p| p / 100.0)),
            ],
        )?);
        out.push(lines(
            "Dead experts and expert-bias range",
            "count / range",
            vec![
                s("dead experts", &|r| num(&r["router"]["dead"])),
                s("bias range", &|r| num(&r["router"]["bias_range"])),
            ],
        )?);
        out.push(heatmap(records)?);
    }
    if records.iter().any(|r| r["kd"].is_object()) {
        out.push(lines(
            "Stage 2: confidence weights",
            "value",
            vec![
                s("mean weight", &|r| num(&r["kd"]["weight_mean"])),
                s("clipped low", &|r| num(&r["kd"]["clipped_low"])),
                s("clipped high", &|r| num(&r["kd"]["clipped_high"])),
                s("mean teacher logp", &|r| num(&r["kd"]["teacher_logp_mean"])),
            ],
        )?);
    }
    // Stage 3's fields of OPD steps (anchor steps have none).
    let opd = |key: &'static str| {
        move |r: &Value| if r["opd"]["anchor"].as_bool() == Some(false) { num(&r["opd"][key]) } else { None }
    };
    if records.iter().any(|r| r["opd"]["anchor"].as_bool() == Some(false)) {
        out.push(lines(
            "Stage 3: teacher − student log-probability",
            "nats per token",
            vec![
                s("reasoning", &opd("advantage_reasoning")),
                s("final", &opd("advantage_final")),
                s("|lp − lp_sampler| (mean)", &opd("mismatch_mean")),
            ],
        )?);
        out.push(lines(
            "Stage 3: rollouts",
            "share",
            vec![s("Harmony validity", &opd("valid_rate")), s("ratio clipped", &opd("clipped"))],
        )?);
        out.push(lines(
            "Stage 3: pipeline",
            "steps / seconds",
            vec![s("lag (steps)", &opd("lag")), s("trainer wait (s)", &opd("stall_s"))],
        )?);
    }
    Ok(out)
}

/// A line chart over steps; empty series are left out, and a chart with none is an error.
fn lines(title: &str, y_desc: &str, all: Vec<Series>) -> Result<Panel> {
    let all: Vec<Series> = all.into_iter().filter(|s| !s.points.is_empty()).collect();
    ensure!(!all.is_empty(), "panel {title:?}: no data");
    let pts = all.iter().flat_map(|s| &s.points);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9 + y1.abs() * 1e-3);
    let (x1, y0, y1) = (x1.max(x0 + 1.0), y0 - pad, y1 + pad);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let mut chart =
            frame(&root, title)?.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_desc)
            .x_labels(((x1 - x0) as usize + 1).clamp(2, 10)) // whole steps, each labelled once
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
        for (i, s) in all.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let drawn = if s.dots {
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            } else {
                chart.draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            };
            drawn
                .map_err(|e| anyhow::anyhow!("{title}: {e}"))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
    }
    Ok(Panel { title: title.into(), svg })
}

fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
) -> Result<ChartBuilder<'a, 'b, SVGBackend<'b>>> {
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
    let mut b = ChartBuilder::on(root);
    b.caption(title, ("sans-serif", 20)).margin(12).x_label_area_size(36).y_label_area_size(64);
    Ok(b)
}

/// The busiest expert's share of routed slots, per MoE layer (rows) and step (columns).
fn heatmap(records: &[Value]) -> Result<Panel> {
    let title = "Expert load: the busiest expert's share of each MoE layer";
    let layers: Vec<String> = records
        .iter()
        .find_map(|r| r["router_layers"].as_array().filter(|a| !a.is_empty()))
        .map(|a| a.iter().filter_map(|l| l[0].as_str().map(String::from)).collect())
        .unwrap_or_default();
    ensure!(!layers.is_empty(), "panel {title:?}: no per-layer router health");
    let cells: Vec<(f64, usize, f64)> = records
        .iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r["router_layers"].as_array()?)))
        .flat_map(|(step, ls)| {
            ls.iter().enumerate().filter_map(move |(i, l)| Some((step, i, l[1]["max_load_pct"].as_f64()?)))
        })
        .collect();
    let (x0, x1) = cells.iter().fold((f64::MAX, f64::MIN), |(a, b), c| (a.min(c.0), b.max(c.0)));
    let (lo, hi) = cells.iter().fold((f64::MAX, f64::MIN), |(a, b), c| (a.min(c.2), b.max(c.2)));
    let span = (hi - lo).max(1e-9);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let n = layers.len();
        let caption = format!("{title} (blue {lo:.0} % → red {hi:.0} %)");
        // Layer i is the band around y = i, so its label sits in the middle of it.
        let mut chart = frame(&root, &caption)?
            .build_cartesian_2d(x0 - 0.5..x1 + 0.5, -0.5..n as f64 - 0.5)
            .map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
        let names = layers.clone();
        let label = move |y: &f64| {
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .y_desc("MoE layer")
            .y_labels(n + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&label)
            .draw()
            .map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
        chart
            .draw_series(cells.iter().map(|&(step, i, pct)| {
                let t = (pct - lo) / span;
                let color = RGBColor((255.0 * t) as u8, (80.0 + 100.0 * (1.0 - t)) as u8, (255.0 * (1.0 - t)) as u8);
                let y = i as f64;
                Rectangle::new([(step - 0.5, y - 0.5), (step + 0.5, y + 0.5)], color.filled())
            }))
            .map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
    }
    Ok(Panel { title: title.into(), svg })
}

/// One HTML page with every panel inline.
pub fn html(run: &str, panels: &[Panel]) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>vpmoe run {run}</title>\n<style>body{{font-family:sans-serif;margin:16px}}\
         section{{display:inline-block;margin:6px;border:1px solid #ccc}}</style></head><body>\n<h1>{run}</h1>\n"
    );
    for p in panels {
        s.push_str(&format!("<section data-panel=\"{}\">\n{}\n</section>\n", p.title.replace('"', "'"), p.svg));
    }
    s.push_str("</body></html>\n");
    s
}

/// Draws `run`'s metrics into `out` (written whole, then moved into place).
pub fn plot(run: &Path, out: &Path) -> Result<usize> {
    let records = read_metrics(run)?;
    let panels = panels(&records)?;
    let page = html(&run.display().to_string(), &panels);
    vpmoe_data::indexed::write_atomic(out, page.as_bytes())?;
    Ok(panels.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Records of a run through all three stages: router health, an evaluation, stage-2
    /// weights, stage-3 OPD and anchor steps.
    fn records() -> Vec<Value> {
        let router = |s: f64| json!({"aux": 1.0 + s / 100.0, "max_load_pct": 20.0 + s, "cv": 0.3, "dead": 0, "entropy": 0.9, "bias_range": 0.002 * s});
        (1..=6)
            .map(|s| {
                let s = s as f64;
                let mut r = json!({"step": s, "lr": 0.01, "loss": 10.0 - s, "ce_reasoning": 5.0 - s / 2.0, "ce_final": 5.0 - s / 3.0,
                    "grad_norm": 2.0 / s, "clip_coef": 1.0, "tokens_per_s": 100.0 + s, "router": router(s),
                    "router_layers": [["blk2", router(s)], ["blk3", router(2.0 * s)]]});
                if s == 3.0 {
                    r["eval"] = json!({"loss": 7.5, "ce_reasoning": 3.0, "ce_final": 4.5, "tokens": 10, "canary_loss": 8.0, "valid_rate": 0.25});
                }
                if s <= 2.0 {
                    r["kd"] = json!({"center": -1.0, "teacher_logp_mean": -1.1, "weight_mean": 1.2, "clipped_low": 0.1, "clipped_high": 0.0});
                } else {
                    r["opd"] = json!({"anchor": s == 4.0, "advantage_reasoning": -1.0 + s / 10.0, "advantage_final": -0.5, "mismatch_mean": 0.01,
                        "valid_rate": 0.5, "clipped": 0.02, "lag": 1, "stall_s": 0.1});
                }
                r
            })
            .collect()
    }

    #[test]
    fn every_panel_has_a_title_axes_and_data() {
        let p = panels(&records()).unwrap();
        let titles: Vec<&str> = p.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(p.len(), 12, "{titles:?}");
        for panel in &p {
            let svg = &panel.svg;
            // Every text element's content, unescaped.
            let texts: Vec<String> = svg
                .split("<text")
                .skip(1)
                .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string()))
                .map(|t| t.replace("&apos;", "'").replace("&quot;", "\"").replace("&amp;", "&"))
                .collect();
            assert!(texts.iter().any(|t| t.starts_with(&panel.title)), "{}: no title in {texts:?}", panel.title);
            assert!(texts.iter().any(|t| t == "step"), "{}: no x axis description", panel.title);
            assert!(texts.len() >= 6, "{}: too few tick labels: {texts:?}", panel.title);
            let data = svg.matches("<polyline").count() + svg.matches("<circle").count() + svg.matches("<rect").count();
            assert!(data >= 2, "{}: no data drawn", panel.title);
        }
        // The held-out and canary points of step 3 are dots on the loss panel.
        assert!(p[0].svg.matches("<circle").count() >= 2 && p[0].svg.contains("canary"));
        let page = html("run", &p);
        assert_eq!(page.matches("<section").count(), 12);
    }

    #[test]
    fn bad_runs_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("vpmoe-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = read_metrics(&dir).unwrap_err().to_string();
        assert!(e.contains("no metrics.jsonl"), "{e}");
        std::fs::write(dir.join("metrics.jsonl"), "").unwrap();
        assert!(read_metrics(&dir).unwrap_err().to_string().contains("no steps yet"));
        std::fs::write(dir.join("metrics.jsonl"), "{\"step\":1,\"loss\":2.0}\n{oops\n").unwrap();
        let e = read_metrics(&dir).unwrap_err().to_string();
        assert!(e.ends_with("metrics.jsonl:2: not JSON"), "{e}");
        std::fs::write(dir.join("metrics.jsonl"), "{\"loss\":2.0}\n").unwrap();
        assert!(read_metrics(&dir).unwrap_err().to_string().contains(":1: not a step record"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
