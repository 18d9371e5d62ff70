"""Dense probes on patch-token views (#24): depth (DINOv2's linear head, scale-invariant log loss) and
semantic segmentation (1×1 linear head, cross-entropy ignoring 255), the whole LR × wd grid trained
at once on cached tokens; per-image metrics, saved predictions and paired comparisons.

``metrics`` (pure numpy), ``heads`` (the batched grid), ``tokens`` (streaming the store's rows),
``fit`` (the run: plan, train, select, report, write), ``compare`` (paired bootstrap over images).
"""
