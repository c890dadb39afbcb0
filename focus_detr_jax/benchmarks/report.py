"""The model benchmark's markdown report (`scripts/benchmark.py`, BENCHMARKS.md "Model
benchmark"): a run header with the same-run baseline, then one table per part that ran."""

from focus_detr_jax.benchmarks import measure as bm


def _g(x):
  return None if x is None else x / 1e9


def report(info, results, command, in_process=False):
  """Markdown of all parts (appendable to BENCHMARKS.md under '## Model benchmark').

  results: [(part, label, result dict)] in plan order, the baseline first.
  """
  base = next((r for p, _, r in results if p == "baseline" and "median_s" in r), None)
  base_s = base["median_s"] if base else None
  base_spec = base["spec"] if base else {}
  base_cfg = base_spec.get("config", "r50")
  base_cfg = {"r50": "R50", "swin_t": "Swin-T"}.get(base_cfg, base_cfg)
  base_size = f"{base_spec.get('height')}x{base_spec.get('width')}"
  kinds = {r["memory"]["kind"] for _, _, r in results if "memory" in r}
  if kinds == {"device_peak_bytes_in_use"}:
    memory_note = "Peak memory is the device allocator's peak bytes in use."
  elif in_process:
    memory_note = ("Peak memory is the peak RSS of the whole process (`--in-process`: all "
                   "measurements share it, so it is cumulative).")
  else:
    memory_note = ("Peak memory is the peak RSS of the measurement's own process (CPU has no "
                   "device allocator stats) and includes ~0.3-0.5 GiB of Python/JAX.")
  out = [f"### Run {info['date']}", "",
         f"Machine: {info['nproc']} cores, {info['cpu']}; backend {info['backend']}; jax "
         f"{info['jax']}, flax {info['flax']}. Command: `{command}`.", "",
         f"Same-run baseline: jitted {base_cfg} backbone (no neck) at {base_size}, batch 1: "
         + (f"**{base_s:.3f} s** median (compile {base['compile_s']:.1f} s, "
            f"{_g(base['flops']):.1f} GFLOPs)" if base else "failed")
         + ". `x baseline` = latency / baseline latency (compare runs by this ratio). "
         + memory_note + " FLOPs are XLA cost analysis (2 per multiply-add). Weights are "
         "random.", ""]

  def rows(part):   # the part's measurements that did not fail, with their labels
    return [dict(label=label, **r) for p, label, r in results if p == part and "error" not in r]

  def ratio(r):
    return r["median_s"] / base_s if base_s and r.get("median_s") else None

  def derive(r):   # the columns of a timed eval or train row
    r.update(x_base=ratio(r), gflops=_g(r["flops"]), mem_gib=r["memory"]["mib"] / 1024,
             compile_total_s=r["lower_s"] + r["compile_s"])
    return r

  evals = rows("eval")
  timed = [derive(r) for r in evals if "median_s" in r]
  if timed:
    out += ["#### Eval forward (model apply + postprocess, jitted)", "",
            bm.markdown_table(timed, [
                ("label", "config size batch", ""), ("median_s", "latency median s", ".3f"),
                ("min_s", "min s", ".3f"), ("images_per_s", "images/s", ".3f"),
                ("x_base", "x baseline", ".2f"), ("compile_total_s", "trace+compile s", ".1f"),
                ("gflops", "GFLOPs", ".1f"), ("mem_gib", "peak mem GiB", ".2f"),
                ("msda", "MSDA", "")]), ""]
  splits = [r for r in evals if r.get("flops_decoder_part")]
  if splits:
    split_rows = []
    for r in splits:
      full, dec, bb = r["flops"], r["flops_decoder_part"], r["flops_backbone_neck"]
      enc = full - dec - bb
      row = dict(label=r["label"], full=_g(full), bb=_g(bb), enc=_g(enc), dec=_g(dec),
                 bb_pct=100 * bb / full, enc_pct=100 * enc / full, dec_pct=100 * dec / full)
      if r.get("decoder_part_median_s") and r.get("median_s"):
        bb_s, dec_s = r["backbone_neck_median_s"], r["decoder_part_median_s"]
        row.update(bb_s=bb_s, dec_s=dec_s, enc_s=r["median_s"] - bb_s - dec_s,
                   all_s=r["median_s"])
      split_rows.append(row)
    out += ["#### FLOPs and latency split (eval, batch 1)", "",
            "backbone+neck and the decoder part (eval forward with `memory` given as input: "
            "XLA drops backbone, neck, foreground scoring, cascade and encoder as dead code; "
            "left: two-stage selection, decoder, heads, post-processing) are compiled and timed "
            "on their own; encoder part = full - both (foreground scoring, cascade top-k, 6 "
            "encoder layers, flattening and positions).", "",
            bm.markdown_table(split_rows, [
                ("label", "config size", ""), ("full", "total GFLOPs", ".1f"),
                ("bb", "backbone+neck", ".1f"), ("bb_pct", "%", ".0f"),
                ("enc", "encoder part", ".1f"), ("enc_pct", "%", ".0f"),
                ("dec", "decoder part", ".1f"), ("dec_pct", "%", ".0f"),
                ("all_s", "full s", ".3f"), ("bb_s", "backbone+neck s", ".3f"),
                ("enc_s", "encoder part s", ".3f"), ("dec_s", "decoder part s", ".3f")]), ""]
  trains = [derive(r) for r in rows("train")]
  if trains:
    for r in trains:
      r["vs_first"] = trains[0]["median_s"] / r["median_s"]
    out += ["#### Train step (value_and_grad of `model_loss`, denoising on, 8 boxes/image)", "",
            bm.markdown_table(trains, [
                ("label", "config size batch MSDA", ""), ("median_s", "step median s", ".2f"),
                ("min_s", "min s", ".2f"), ("x_base", "x baseline", ".2f"),
                ("vs_first", "speed-up vs first row", ".2f"),
                ("compile_total_s", "trace+compile s", ".1f"), ("gflops", "GFLOPs", ".1f"),
                ("mem_gib", "peak mem GiB", ".2f")]), ""]
  sweep = rows("sweep")
  if sweep:
    dense = sweep[0]
    source = dense if dense.get("flops_decoder_part") else next(
        (r for r in splits if r["spec"]["config"] == dense["spec"]["config"]
         and r["spec"]["height"] == dense["spec"]["height"]
         and r["spec"]["width"] == dense["spec"]["width"]
         and r["spec"].get("model", {}) == {k: v for k, v in dense["spec"].get("model", {}).items()
                                            if k not in ("cascade", "focus_rho")}), None)
    # FLOPs that do not depend on the cascade: backbone+neck + decoder part
    fixed = source and source["flops_decoder_part"] + source["flops_backbone_neck"]
    for r in sweep:
      r["gflops"] = _g(r["flops"])
      r["enc_gflops"] = _g(r["flops"] - fixed) if fixed else None
      r["flops_vs_dense"] = r["flops"] / dense["flops"]
      r["enc_vs_dense"] = (r["flops"] - fixed) / (dense["flops"] - fixed) if fixed else None
      r["lat_vs_dense"] = r["median_s"] / dense["median_s"] if r.get("median_s") else None
      r["x_base"] = ratio(r)
      r["caps"] = ",".join(str(c) for c in r["capacities"])
      if r.get("reused_from"):
        r["label"] += " [same program as an eval row: its measurement]"
    sp = dense["spec"]
    out += [f"#### Keep-ratio sweep ({sp['config']}, {sp['height']}x{sp['width']}, batch 1, "
            "eval)", "",
            f"N = {dense['num_tokens']} tokens; K_l = encoder tokens updated per layer. Dense = "
            "cascade 1.0 for every layer with focus_rho = (N - 0.5) / N so that K_l = N "
            "(focus_rho = 1.0 gives N + 1 and top_k fails). Baseline of this table: the dense "
            "row, same run.", "",
            bm.markdown_table(sweep, [
                ("label", "setting", ""), ("caps", "K_l per layer", ""),
                ("gflops", "total GFLOPs", ".1f"), ("flops_vs_dense", "vs dense", ".2f"),
                ("enc_gflops", "encoder part GFLOPs", ".1f"), ("enc_vs_dense", "vs dense", ".2f"),
                ("median_s", "latency s", ".3f"), ("lat_vs_dense", "vs dense", ".2f"),
                ("x_base", "x baseline", ".2f")]), ""]
  bf16 = [derive(r) for r in rows("bf16")]
  if bf16:
    for r in bf16:
      r["vs_f32"] = r["median_s"] / bf16[0]["median_s"]
    out += ["#### bf16 vs float32 (eval)", "",
            bm.markdown_table(bf16, [
                ("label", "setting", ""), ("median_s", "latency s", ".3f"),
                ("vs_f32", "vs float32", ".2f"), ("x_base", "x baseline", ".2f"),
                ("compile_total_s", "trace+compile s", ".1f"),
                ("mem_gib", "peak mem GiB", ".2f")]), ""]
  errors = [f"- {p} {label}: `{r['error'][-300:]}`" for p, label, r in results if "error" in r]
  if errors:
    out += ["#### Failed", ""] + errors + [""]
  return "\n".join(out)
