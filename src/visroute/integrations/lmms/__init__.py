"""The lmms-eval plug-in: a chat model `visroute` that runs any lmms-eval task on a routed model.

    lmms-eval --model visroute \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,routing=pdrop@128,blind=false,dtype=bfloat16,batch_size=8 \\
        --tasks pope,refcoco_bbox_rec_val --output_path logs/

It registers through lmms-eval's entry-point group `lmms_eval.models` (`manifests` below), so nothing in the
lmms-eval installation is patched. This module stays light: lmms-eval imports it while its model registry is
still being built, and the model class loads only when a run asks for it.
"""

from __future__ import annotations

MODEL_ID = "visroute"


def manifests():
    """The entry point's payload: one chat model, `visroute`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path="visroute.integrations.lmms.model.VisrouteLMM")
