"""The objects every service call needs, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from computeplane.services.notifier import DesiredStateNotifier
from computeplane.settings import Settings
from computeplane.store.database import Database


@dataclass(frozen=True)
class ServiceContext:
    settings: Settings
    database: Database
    notifier: DesiredStateNotifier
