"""Stage `audio_eye`: the conditional flow from audio features to eye weights (EDTalk++), so audio-driven videos
blink. The recipe is audio_pose's (Eq. 13-14 on EYLN's weights instead of PLN's); see `audio_pose.flow_stage`.
It starts from audio_pose's folder, so its model carries every module trained before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.train.stages.audio_pose import FlowParams, flow_stage


@dataclass
class AudioEyeParams(FlowParams):
    """The `audio_eye:` section of params.yaml (fields: audio_pose.FlowParams)."""


STAGE = flow_stage("audio_eye", "eye", "eye_flow", "audio_pose", AudioEyeParams)
