"""Pipeline step: self-supervised pretraining of the template's backbone on unlabelled images ->
Model (the ``segcore pretrain`` output folder), which the train step starts from.

The step is always in the DAG (kfp's local runner has no conditions) and does its work only when
``pretrain_data_uri`` names a folder of images; otherwise it writes an empty Model marked
``pretrained: false``, which the train step ignores. With ``checkpoint_uri`` the pretraining
writes to ``<checkpoint_uri>/pretrain-<key>`` after every epoch and always resumes there, so a
retried attempt continues, and a distributed training's nodes read the weights from there.
"""

from kfp.dsl import Model, Output

from components.common import DEFAULT_IMAGE, make_component


def pretrain(
    template: str,
    pretrained: Output[Model],
    pretrain_data_uri: str = "",
    pretrain_epochs: int = 0,
    pretrain_batch_size: int = 0,
    pretrain_input_size: str = "",
    num_workers: int = 2,
    checkpoint_uri: str = "",
    s3_endpoint: str = "",
    tracking: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "segcore",
    mlflow_parent_run_id: str = "",
):
    """DetCon pretraining of the backbone on pretrain_data_uri (a folder of images); "" = skipped.
    0 / "" = segcore pretrain's defaults (10 epochs, batch 16, views 224x224)."""
    import hashlib
    import json
    import shutil
    from pathlib import Path

    from components import common
    from segcore import storage
    from segcore.steps.pretrain import PretrainOptions, pretrain_step
    from segcore.tracking import parent_status

    Path(pretrained.path).mkdir(parents=True, exist_ok=True)
    if not pretrain_data_uri:
        pretrained.metadata.update(pretrained=False)
        return
    storage.configure(s3_endpoint or None)
    options = PretrainOptions(
        epochs=pretrain_epochs or None,
        batch_size=pretrain_batch_size or None,
        input_size=common.size(pretrain_input_size),
        num_workers=num_workers,
    )
    tracking_options = common.tracking(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id)
    target = pretrained.path
    if checkpoint_uri:
        key = json.dumps([template, pretrain_data_uri, pretrain_epochs, pretrain_batch_size, pretrain_input_size])
        target = f"{checkpoint_uri.rstrip('/')}/pretrain-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    with parent_status(tracking_options):
        meta = pretrain_step(template, pretrain_data_uri, target, options, resume=True, tracking=tracking_options)
    if target != pretrained.path:
        if storage.is_s3(target):
            storage.download(target, pretrained.path)
        else:
            shutil.copytree(target, pretrained.path, dirs_exist_ok=True)
    pretrained.metadata.update(
        pretrained=True,
        framework="pytorch",
        format="segcore-pretrained-backbone",
        template=meta["template"],
        images=meta["images"],
        final_loss=meta["final_loss"],
        uri=target,
    )


def component(image: str = DEFAULT_IMAGE):
    return make_component(pretrain, image)


pretrain_op = component()
