"""An evaluation report shared by the snapshot and usability tests (what Get shows)."""

from securefl.ml.train import ClassMetrics, EvalReport

REPORT = EvalReport(
    accuracy=0.8125, macro_f1=0.8011,
    per_class={"glioma": ClassMetrics(0.75, 0.75, 0.75, 4),
               "meningioma": ClassMetrics(0.667, 1.0, 0.8, 4),
               "notumor": ClassMetrics(1.0, 0.75, 0.857, 4),
               "pituitary": ClassMetrics(0.8, 0.75, 0.774, 4)},
    confusion=[[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 3, 1], [1, 0, 0, 3]], num_samples=16,
    balanced_accuracy=0.8125, split="validation", ece_before=0.142, ece_after=0.051,
    temperature=1.8)
