"""Trainer wiring: the ``training.requests.v1`` consumer over the chosen backend.

``DISTILLERY_TRAINER_BACKEND=local`` (default): runs train in child processes of this service;
``kubernetes``: one Job per run (``services.trainer.k8s``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.events import TRAINING_EVENTS_TOPIC, TrainingEvent
from services.trainer.consumers import register_trainer

if TYPE_CHECKING:
    from services.platform import Platform


async def setup(platform: Platform) -> None:
    settings = platform.settings
    broker = platform.broker

    async def publish(event: TrainingEvent) -> None:
        await broker.publish(event.model_dump(mode="json"), TRAINING_EVENTS_TOPIC, key=event.job_id.encode())

    if settings.trainer_backend == "kubernetes":
        from services.trainer.k8s import KubernetesTrainer

        backend = KubernetesTrainer(settings, publish)
    elif settings.trainer_backend == "local":
        from services.trainer.service import LocalTrainer

        backend = LocalTrainer(settings, publish)
    else:
        raise ValueError(
            f"DISTILLERY_TRAINER_BACKEND must be 'local' or 'kubernetes', not {settings.trainer_backend!r}"
        )
    register_trainer(broker, backend, settings)
    platform.state["trainer"] = backend
    platform.on_started.append(backend.start)
    platform.on_stopping.append(backend.stop)
