"""Speed features: plug-ins of a run that make training cheaper (in time, or in memory as gradient checkpointing)
without changing what is learned.

Each is switched by the `train:` field of its name. A run installs every switched-on feature on the
adapted model once its starting loss is measured: `install` returns what the feature did (reported in the
result under `speed.<name>`) or None where it does not apply. A feature may give every training
micro-batch a context (`batch`), and is removed before inference latency is timed, so latency is the
model's own forward as it would be served.

Adding a feature: a class in this package and a line in `FEATURES` (plus its `train:` switch).
"""

from __future__ import annotations

from peftlab.train.speed.base import SpeedFeature
from peftlab.train.speed.checkpointing import GradientCheckpointing
from peftlab.train.speed.compile import CompiledLayers
from peftlab.train.speed.head_positions import LastLayerAtHead
from peftlab.train.speed.prefix_cache import PrefixCacheFeature

# in install order; gradient checkpointing before compilation, so that the compiled layers are the checkpointed ones
FEATURES: list[type[SpeedFeature]] = [LastLayerAtHead, PrefixCacheFeature, GradientCheckpointing, CompiledLayers]


def switched_on(train_spec) -> list[SpeedFeature]:
    """The features a TrainSpec switches on, ready to install."""
    return [feature() for feature in FEATURES if getattr(train_spec, feature.name)]
