"""Evaluation: Inception features through torch-fidelity (eval.fidelity), reference statistics
(eval.reference), the ADM evaluator's table (eval.adm), the demo classifier; ``python -m
eval.gfid`` runs them. The FID of two sets of statistics is titok_core.metrics'."""
from eval.fidelity import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionFeatures,
    InceptionWeightsError,
    build_inception,
    hub_weights_path,
)
from eval.reference import (
    ADM_REFERENCE_URL,
    ReferenceStatsError,
    load_reference_stats,
    read_reference_meta,
    reference_stats_from_folder,
    save_reference_stats,
    stats_from_npz_images,
)
from titok_core.metrics import features_to_stats, fid_from_stats

__all__ = [
    "ADM_REFERENCE_URL",
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "InceptionFeatures",
    "InceptionWeightsError",
    "ReferenceStatsError",
    "build_inception",
    "features_to_stats",
    "fid_from_stats",
    "hub_weights_path",
    "load_reference_stats",
    "read_reference_meta",
    "reference_stats_from_folder",
    "save_reference_stats",
    "stats_from_npz_images",
]
