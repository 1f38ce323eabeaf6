"""Queue a prime count from a cron job (or any script): the serving processes of ``examples/app.py`` run it.

This process is a client only (``MPC_ROLE=client``): it imports the app's controller — the same
name, the same store (the app's ``instance/mpc-tasks.sqlite3``, or ``MPC_STORE_URL``) — queues a
task into the store, prints its uuid and exits; it starts no task process. A crontab line::

    30 2 * * *  cd /srv/primes && MPC_ROLE=client python examples/cron_submit.py 500000 >> cron.log 2>&1

Then ``curl http://127.0.0.1:5000/primes/<uuid>`` (or ``?wait=25``) shows the task, as for any POST.
"""
import argparse
import os
import sys

# Before the app module makes its controllers: this process queues work, the servers run it.
os.environ.setdefault("MPC_ROLE", "client")

from app import primes  # noqa: E402  (the serving app's own controller: examples/app.py)


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description="Queue a prime count for the servers of examples/app.py.")
    parser.add_argument("limit", nargs="?", type=int, default=100_000, help="count the primes below this")
    limit = parser.parse_args(argv).limit
    try:
        print(primes.submit(limit=limit))
    finally:
        primes.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
