"""LED-Merging's own steps: Location, Election, Disjoint (see docs/methods.md), and the files between them.

- `location`: importance scores of a model on a calibration set (the `importance` step), with `per_example`,
  each example's gradient inside a micro-batch.
- `election`: TopR election (patterns) and Disjoint, tensor by tensor from files (the `election` and
  `disjoint` steps), and the mask statistics.
- `files`: the score and mask file formats, their readers (`ScoreFile`, `MaskFile`: one open per file) and
  writers, the provenance they record, and `MaskFiles`, the LED masks a merge reads.

The merge itself is a merge method like the others (`ledmerge.merge.led`); exact top-k selection, shared with
TIES and Breadcrumbs, is `ledmerge.topk`. Nothing is imported here: import the submodule you need.
"""
