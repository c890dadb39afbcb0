"""Record parity reference sets from the official detrex Focus-DETR (PyTorch, CPU).

This subpackage is optional: it needs an environment with torch, detectron2 and detrex installed
(see docs/reproducibility.md and requirements-reference.txt); the main package never imports it.
`scripts/record_reference.py` is its command line. The sets it writes have the layout of
`shared/parity/public` (file names, array names, the deterministic weight rule and its manifest),
so `scripts/check_parity.py` compares our model against them.

Nothing of detrex is patched on disk: the recorder observes the model through forward hooks and
wrappers installed around one forward call, teacher-forces the data-dependent `torch.topk` calls
when asked, records the random draws of contrastive denoising, and maps detrex's hard-coded
`.cuda()` / `.to("cuda")` calls to the CPU while it runs.
"""
