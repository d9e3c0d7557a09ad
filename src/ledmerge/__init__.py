"""ledmerge: safety-aware merging of fine-tuned language models.

LED-Merging (Location, Election, Disjoint) and data-aware merging, with the baselines they are
compared against, built as small composable steps that the Snakemake workflow in this repository
chains together. See `docs/methods.md` for the formulas.
"""

__version__ = "0.1.0"
