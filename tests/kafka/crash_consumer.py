"""Run a StreamConsumer with a Ledger that SIGKILLs its own process right
after the database commit of batch K, before the offset commit.

    python -m tests.kafka.crash_consumer BOOTSTRAP TOPIC GROUP DB_PATH K BATCH_SIZE
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from tomd.alerts.broker import LOCAL_GROUP_SETTINGS
from tomd.alerts.consumer import ConsumerSettings, StreamConsumer
from tests.kafka.ledger import Ledger


def main() -> None:
    bootstrap, topic, group, db_path, kill_after, batch_size = sys.argv[1:7]

    def crash(batch, call_no: int) -> None:
        if call_no == int(kill_after):
            # The database transaction for this batch has committed; the
            # offset commit has not happened yet.
            os.kill(os.getpid(), signal.SIGKILL)

    settings = ConsumerSettings(bootstrap=bootstrap, topics=[topic], group=group,
                                batch_size=int(batch_size), batch_timeout_s=0.2,
                                kafka=LOCAL_GROUP_SETTINGS)
    StreamConsumer(settings, Ledger(db_path, after=crash)).run(threading.Event())


if __name__ == "__main__":
    main()
