"""The evaluation modes of `evaluate.py` and the report that gathers them.

Each mode returns a JSON-able dict and writes its own files under `<workdir>/report/`; `report` runs every mode
the workdir allows (a mode whose inputs are missing is recorded as skipped, with the reason) and writes
report.md, report.json, PNG figures and NIfTI volumes of generated scans.
"""

from __future__ import annotations

import datetime
import io
import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from ldae_jax.data import atomic
from ldae_jax.evaluation import checks, figures, known_factors, probes, reconstruction as rec, throughput
from ldae_jax.workdir import Workdir


def _jsonable(o: Any) -> Any:
  if isinstance(o, dict):
    return {str(k): _jsonable(v) for k, v in o.items() if not isinstance(v, np.ndarray) or v.size < 64}
  if isinstance(o, (list, tuple)):
    return [_jsonable(v) for v in o]
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  return o


def _write_json(path: pathlib.Path, obj: Any) -> None:
  atomic.write_bytes(path, json.dumps(_jsonable(obj), indent=1, allow_nan=True).encode("utf-8"))


def _save_nifti(path: pathlib.Path, vol: np.ndarray, config) -> None:
  from ldae_jax.data import nifti
  nifti.save_volume(path, np.asarray(vol, np.float32), spacing_mm=float(config.data.spacing_mm))


# ------------------------------------------------------------------------------------------------ probe
def probe_markdown(results: dict[str, dict], code_norm: str = "none") -> str:
  """The probe tables of `run_probe`'s results: metrics, known-factor read-out (synthetic cohorts), code spread.

  `code_norm` is the trained encoder's `config.encoder.code_norm`: a standardised ("template") code has a spread
  near 1 by construction, so there the spread says nothing about collapse and the note points elsewhere."""
  md = probes.format_table(results)
  with_factors = {n: r["known_factors"] for n, r in results.items() if "known_factors" in r}
  if with_factors:
    md += "\n" + probes.format_factor_table(with_factors)
  spread = ", ".join(f"{n} {r['code_spread']:.2g}" for n, r in results.items() if "code_spread" in r)
  if code_norm == "template":
    note = ("The trained code is standardised per dimension (config.encoder.code_norm='template'), so its spread "
            "is ~1 by construction and cannot show a collapse; whether decoding uses the code is what the "
            "code-use section measures.")
  else:
    note = ("A trained spread far below the untrained encoder's means the encoder has collapsed towards a "
            "constant code: a probe may still read it, but decoding barely depends on it.")
  if LATENT_ROW in results:
    note += (f" The '{LATENT_ROW}' rows read the flattened autoencoder latent (the scan as stage 3 sees it) with the "
             "same probes: what the code could carry at best through this autoencoder.")
  return md + f"\nCode spread (std across scans / RMS of the codes): {spread}. {note}\n"


# The probe row of the flattened autoencoder latents (a reference point, not an encoder).
LATENT_ROW = "AE latent"


def _save_codes(path: pathlib.Path, codes: dict[str, dict[str, dict[str, np.ndarray]]]) -> None:
  """`codes.npz`: `<encoder>/<split>/<field>` arrays (codes, diagnosis, age, subject, scan_id), for analyses
  of one's own."""
  flat = {f"{enc}/{split}/{k}": np.asarray(v) for enc, by_split in codes.items()
          for split, d in by_split.items() for k, v in d.items()}
  buf = io.BytesIO()
  np.savez_compressed(buf, **{k: (v.astype(str) if v.dtype == object else v) for k, v in flat.items()})
  atomic.write_bytes(path, buf.getvalue())


def latent_probe_inputs(probe_inputs: dict[str, dict], latents: dict[str, np.ndarray]) -> dict[str, dict]:
  """The probes' inputs (labels, subjects) of each split with the codes replaced by the flattened latents."""
  out = {}
  for split, d in probe_inputs.items():
    mu = np.asarray(latents[split])
    if len(mu) != len(d["codes"]):
      raise ValueError(f"{split}: {len(mu)} latents for {len(d['codes'])} codes; the latent shards changed.")
    out[split] = dict(d, codes=mu.reshape(len(mu), -1))
  return out


def run_probe(config: ml_collections.ConfigDict, workdir: str, out: pathlib.Path,
              models: rec.LDAEModels | None = None) -> tuple[dict, dict]:
  """Probes on the trained EMA encoder's codes and, beside them, on an untrained encoder's codes and the AE latents."""
  m = models or rec.load_ldae(config, workdir)
  bs = int(config.eval.batch_size)
  splits = {s: rec.read_split(workdir, s, fields=("image", "mu")) for s in ("train", "test")}
  results, fitted, codes = {}, {}, {}
  rand_def, rand_state = rec.random_encoder(config)
  for name, (d, s) in {"trained": (m.enc_def, m.enc_state), "untrained": (rand_def, rand_state)}.items():
    data = {}
    for split, v in splits.items():
      data[split] = {"codes": rec.semantic_codes(d, s, v["image"], bs, desc=f"{name} codes {split}"),
                     "diagnosis": v["diagnosis"], "age": v["age"], "subject": v["subject"],
                     "scan_id": v["scan_id"]}
    results[name], fitted[name] = probes.run_probes(data["train"], data["test"], seed=int(config.seed))
    codes[name] = data
    results[name]["code_spread"] = probes.relative_spread(np.concatenate([data[s]["codes"] for s in data]))
  _save_codes(out / "codes.npz", codes)
  # What a linear read-out of the autoencoder's latent itself reaches: the information stage 3 can compress into
  # a code at best, so a trained code near it is limited by the autoencoder, not by the encoder.
  latent = latent_probe_inputs(codes["trained"], {split: v["mu"] for split, v in splits.items()})
  results[LATENT_ROW], _ = probes.run_probes(latent["train"], latent["test"], seed=int(config.seed))
  truth = known_factors.read(config, workdir)
  if truth is not None:
    tr, te = (known_factors.table(truth, splits[s]["scan_id"], s) for s in ("train", "test"))
    for name, data in {**codes, LATENT_ROW: latent}.items():
      results[name]["known_factors"] = probes.factor_recovery(
          data["train"]["codes"], tr, data["train"]["subject"], data["test"]["codes"], te, data["test"]["subject"],
          seed=int(config.seed))
  table = probe_markdown(results, str(config.encoder.code_norm))
  atomic.write_bytes(out / "probes.md", table.encode("utf-8"))
  _write_json(out / "probes.json", results)
  print(table)
  c, a = results["trained"]["ad_vs_cn"]["test"], results["trained"]["age"]["test"]
  print(f"AD-vs-CN test ROC-AUC {c['roc_auc']:.3f} (untrained encoder "
        f"{results['untrained']['ad_vs_cn']['test']['roc_auc']:.3f}); age MAE {a['mae']:.2f} y vs cohort age "
        f"std {a['target_std']:.2f} y")
  return results, fitted


# ------------------------------------------------------------------------------------------------ code use
def run_code_use(config, workdir, out, models=None) -> dict:
  """Does decoding use the code? Loss gap own vs another subject's code, swapped decodes, semantic-only error."""
  from ldae_jax.data import shards
  from ldae_jax.evaluation import code_use
  m = models or rec.load_ldae(config, workdir)
  data = rec.read_split(workdir, "test", int(config.eval.max_scans))
  mean_latent = shards.field_mean(Workdir(workdir).shards("train"), "mu")
  r = code_use.evaluate_code_use(m, config, data, mean_latent, steps=int(min(config.eval.ddim_steps)),
                                 seed=int(config.seed))
  md = code_use.markdown(r)
  atomic.write_bytes(out / "code_use.md", md.encode("utf-8"))
  _write_json(out / "code_use.json", r)
  print(md)
  return r


# ------------------------------------------------------------------------------------------------ recon
def run_recon(config, workdir, out, models=None) -> dict:
  m = models or rec.load_ldae(config, workdir)
  data = rec.read_split(workdir, "test", int(config.eval.max_scans))
  r = rec.evaluate_reconstruction(m, config, data, mean_image=rec.mean_train_image(workdir), seed=int(config.seed))
  vols = r.pop("volumes")
  rows, labels = [], []
  t_max = max(k for k in vols if k != "image")
  for i in range(min(3, len(vols["image"]))):
    rows.append([vols["image"][i], vols[t_max]["ae_recon"][i], vols[t_max]["recon"][i], vols[t_max]["semantic"][i]])
    labels.append(str(data["scan_id"][i]))
    _save_nifti(out / "volumes" / f"recon_T{t_max}_{data['scan_id'][i]}.nii.gz", vols[t_max]["recon"][i], config)
    _save_nifti(out / "volumes" / f"semantic_T{t_max}_{data['scan_id'][i]}.nii.gz", vols[t_max]["semantic"][i],
                config)
  r["figure"] = figures.volume_grid(rows, out / "reconstructions.png", row_labels=labels,
                                    col_labels=["image", "AE", f"LDAE T={t_max}", "y_sem only"],
                                    title="Reconstructions (three mid-slices each)")
  for t, s in r["by_steps"].items():
    print(f"T={t}: SSIM encoded x_T {s['encoded_vs_image/ssim']['mean']:.4f}, AE reconstruction "
          f"{s['ae_vs_image/ssim']['mean']:.4f}, semantic-only {s['semantic_vs_image/ssim']['mean']:.4f}, "
          f"cohort-mean image {s['cohort_mean_vs_image/ssim']['mean']:.4f}")
  _write_json(out / "recon.json", r)
  return r


# ------------------------------------------------------------------------------------------------ interp
def run_interp(config, workdir, out, models=None) -> dict:
  from ldae_jax.evaluation import interpolation
  m = models or rec.load_ldae(config, workdir)
  data = rec.read_split(workdir, "test", int(config.eval.max_scans))
  r = interpolation.evaluate_interpolation(m, config, data, steps=int(max(config.eval.ddim_steps)))
  ex = r.pop("examples", None)
  if ex is not None:
    rows = [[ex["start"][i], ex["target"][i], ex["pred"][i], ex["end"][i]] for i in range(len(ex["pred"]))]
    r["figure"] = figures.volume_grid(
        rows, out / "interpolations.png", row_labels=[f"{x['subject']} a={x['alpha']:.2f}" for x in ex["rows"]],
        col_labels=["start", "true middle", "interpolated", "end"], title="Interpolation (LERP y, SLERP x_T)")
    for i, v in enumerate(ex["pred"]):
      _save_nifti(out / "volumes" / f"interp_{ex['rows'][i]['subject']}_{i}.nii.gz", v, config)
  _write_json(out / "interp.json", r)
  print(f"interpolation: {r['n']} triplets; by prediction gap: {r.get('by_prediction_gap_months')}")
  return r


# ------------------------------------------------------------------------------------------------ manip
def run_manip(config, workdir, out, models=None, fitted=None) -> dict:
  from ldae_jax.evaluation import manipulation
  m = models or rec.load_ldae(config, workdir)
  if fitted is None:
    _, fitted = run_probe(config, workdir, out, m)
  data = rec.read_split(workdir, "test", int(config.eval.max_scans))
  r = manipulation.evaluate_manipulation(m, config, data, fitted["trained"]["ad_vs_cn"],
                                         steps=int(max(config.eval.ddim_steps)), seed=int(config.seed))
  for name in ("AD_to_CN", "CN_to_AD"):
    d = r[name]
    if d.get("n"):
      rows = [[d["originals"][i], *d["volumes"][i]] for i in range(d["n"])]
      d["figure"] = figures.volume_grid(rows, out / f"manipulation_{name}.png", row_labels=d["scan_ids"],
                                        col_labels=["original"] + [f"alpha={a}" for a in r["alphas"]],
                                        title=name.replace("_", " "))
      _save_nifti(out / "volumes" / f"manip_{name}_{d['scan_ids'][0]}_alpha{r['alphas'][-1]}.nii.gz",
                  d["volumes"][0][-1], config)
      print(f"{name}: p(AD) of re-encoded edits by alpha {r['alphas']}: "
            f"{np.round(d['p_ad_reencoded_by_alpha'], 3).tolist()}; mean |change| of the decoded image "
            f"{np.round(d['mean_abs_change_by_alpha'], 5).tolist()}")
  v = r["variations"]
  v["figure"] = figures.volume_grid([[v["original"], *v["volumes"]]], out / "variations.png",
                                    row_labels=[v["scan_id"]], col_labels=["original"] + [
                                        f"x_T #{i}" for i in range(v["n"])], title="Stochastic variations")
  _write_json(out / "manip.json", r)
  return r


# ------------------------------------------------------------------------------------------------ throughput
def run_throughput(config, dae_config, *, batch: int, steps: int, repeats: int = 3, peak_tflops=None,
                   workdir=None, out_dir="benchmarks/results") -> pathlib.Path:
  r = throughput.compare(config, dae_config, batch=batch, steps=steps, repeats=repeats, peak_tflops=peak_tflops,
                         workdir=workdir)
  dev = r["device"]["kind"].replace(" ", "_") or r["device"]["platform"]
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  path = pathlib.Path(out_dir) / f"throughput_{dev}_{stamp}.json"
  _write_json(path, r)
  print(json.dumps(r["ratio_dae_over_ldae"], indent=1))
  return path


# ------------------------------------------------------------------------------------------------ report
def run_report(config, workdir: str) -> pathlib.Path:
  out = Workdir(workdir).report
  (out / "volumes").mkdir(parents=True, exist_ok=True)
  sections: dict[str, Any] = {}
  try:
    models = rec.load_ldae(config, workdir)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"report: cannot load the trained models from {workdir}: {e}")
  probe_res, fitted = run_probe(config, workdir, out, models)
  sections["probe"] = probe_res
  for name, fn in (("code_use", lambda: run_code_use(config, workdir, out, models)),
                   ("recon", lambda: run_recon(config, workdir, out, models)),
                   ("interp", lambda: run_interp(config, workdir, out, models)),
                   ("manip", lambda: run_manip(config, workdir, out, models, fitted))):
    try:
      sections[name] = fn()
    except (FileNotFoundError, ValueError, KeyError) as e:
      sections[name] = {"skipped": str(e)}
  sections["checks"] = checks.run_checks(sections)
  print(checks.markdown(sections["checks"]))
  sections["models"] = {"checkpoint_steps": models.steps, "scale_factor": models.scale}
  sections["device"] = str(jax.devices()[0])
  _write_json(out / "report.json", sections)
  md = ["# LDAE evaluation report", f"config `{config.name}`, workdir `{workdir}`, {sections['device']}", "",
        "## Linear probes (codes of the EMA encoder vs an untrained encoder, and the AE latent itself)",
        probe_markdown(probe_res, str(config.encoder.code_norm))]
  if "loss" in sections.get("code_use", {}):
    from ldae_jax.evaluation import code_use
    md += ["## Does decoding use the code? (test split)", code_use.markdown(sections["code_use"])]
  if "by_steps" in sections.get("recon", {}):
    md += ["## Reconstruction (test split, SSIM against the image unless marked)", "| T | LDAE enc. x_T | MS-SSIM | "
           "MSE | PSNR | y_sem only | AE reconstruction | cohort-mean image | LDAE vs AE reconstruction |",
           "|---|---|---|---|---|---|---|---|---|"]
    for t, s in sections["recon"]["by_steps"].items():
      md.append(f"| {t} | {s['encoded_vs_image/ssim']['mean']:.4f} | {s['encoded_vs_image/ms_ssim']['mean']:.4f} | "
                f"{s['encoded_vs_image/mse']['mean']:.5f} | {s['encoded_vs_image/psnr']['mean']:.2f} | "
                f"{s['semantic_vs_image/ssim']['mean']:.4f} | {s['ae_vs_image/ssim']['mean']:.4f} | "
                f"{s['cohort_mean_vs_image/ssim']['mean']:.4f} | {s['encoded_vs_ae/ssim']['mean']:.4f} |")
    md += ["", f"SSIM: MONAI formulation, Gaussian kernel {config.eval.ssim_kernel}, sigma 1.5, valid window.",
           "![reconstructions](reconstructions.png)", ""]
  if sections.get("interp", {}).get("n"):
    md += ["## Interpolation of a middle session from its neighbours (SSIM)", "| prediction gap (months) | n | "
           "LDAE vs image | nearest session vs image | voxel average vs image | LDAE vs AE reconstruction | "
           "nearest vs AE rec. | average vs AE rec. |", "|---|---|---|---|---|---|---|---|"]
    for g, v in sections["interp"]["by_prediction_gap_months"].items():
      md.append(f"| {g} | {v['n']} | {v['ssim_vs_image']:.4f} | {v['nearest_ssim_vs_image']:.4f} | "
                f"{v['average_ssim_vs_image']:.4f} | {v['ssim_vs_ae']:.4f} | {v['nearest_ssim_vs_ae']:.4f} | "
                f"{v['average_ssim_vs_ae']:.4f} |")
    md += ["", "The two baselines use no model: an interpolation that does not beat copying the nearest session "
           "against the real scan has not shown anything."]
    md += ["", "![interpolations](interpolations.png)", ""]
  if "alphas" in sections.get("manip", {}):
    md += ["## Manipulation (probe direction, AD positive)", f"alphas {sections['manip']['alphas']}"]
    for name in ("AD_to_CN", "CN_to_AD"):
      if sections["manip"][name].get("n"):
        md += [f"- {name}: p(AD) of the re-encoded edit by alpha "
               f"{np.round(sections['manip'][name]['p_ad_reencoded_by_alpha'], 3).tolist()}; mean |change| of "
               f"the decoded image {np.round(sections['manip'][name]['mean_abs_change_by_alpha'], 5).tolist()}",
               f"  ![{name}](manipulation_{name}.png)"]
    md += ["", "![variations](variations.png)", ""]
  for name in ("code_use", "recon", "interp", "manip"):
    if "skipped" in sections.get(name, {}):
      md.append(f"- {name} skipped: {sections[name]['skipped']}")
  md[3:3] = ["## Does the run show the method? (each figure beside its baseline)", checks.markdown(sections["checks"]),
             ""]
  atomic.write_bytes(out / "report.md", ("\n".join(md) + "\n").encode("utf-8"))
  print(f"wrote {out / 'report.md'}")
  return out / "report.md"
