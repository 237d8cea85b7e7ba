"""The learned heads of the intermediate-layer terms that a config switches on (weight > 0): one construction for
the run that trains them and for `crosskd plan`, which counts their parameters."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from crosskd.config import RouterConfig
from crosskd.losses.contrastive import ContrastiveMatcher
from crosskd.losses.layerwise import LayerwiseMatcher
from crosskd.losses.router import DenseGroupMatcher, StudentAwareRouter, default_student_layer
from crosskd.schedules import ScheduleSettings


@dataclass
class FeatureHeads:
    matcher: DenseGroupMatcher | StudentAwareRouter | None  # the feature term (router or dense matching)
    layerwise: LayerwiseMatcher | None
    contrastive: ContrastiveMatcher | None

    def all(self) -> list[nn.Module]:
        return [head for head in (self.matcher, self.layerwise, self.contrastive) if head is not None]


def build_feature_heads(router: RouterConfig, settings: ScheduleSettings, teacher_hidden: int, teacher_layers: int,
                        student_hidden: int, student_layers: int) -> FeatureHeads:
    """The heads of the switched-on terms, created in this order (the order their random initialisations are drawn)."""
    matcher = layerwise = contrastive = None
    if settings.feature_alpha > 0:
        common = dict(student_layer=router.student_layer or default_student_layer(student_layers),
                      num_experts=router.num_experts)
        matcher = (DenseGroupMatcher(student_hidden, teacher_hidden, teacher_layers, **common) if router.dense
                   else StudentAwareRouter(student_hidden, teacher_hidden, teacher_layers, top_k=router.top_k, **common))
    if settings.layerwise_alpha > 0:
        layerwise = LayerwiseMatcher(student_hidden, teacher_hidden, student_layers, teacher_layers)
    if settings.contrastive_alpha > 0:
        # The last hidden states on both sides (the student's and teacher's final-norm outputs).
        contrastive = ContrastiveMatcher(student_hidden, teacher_hidden, temperature=router.contrastive_temperature,
                                         student_layer=student_layers, teacher_layer=teacher_layers)
    return FeatureHeads(matcher, layerwise, contrastive)
