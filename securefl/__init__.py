"""securefl: federated training of a brain-tumour MRI classifier with secure aggregation.

Hospitals train locally; a server combines their model updates with pairwise masks that
cancel only in the sum, so it learns the new global model and nothing about any one
hospital.  See README.md and docs/.
"""

__version__ = "0.1.0"
