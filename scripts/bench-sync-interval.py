#!/usr/bin/env python3
"""JetStream R1 file-store publish throughput under each durability mode of nats/README.md.

Starts the pinned nats-server (scripts/setup.sh) once per config (nats/dev.conf: fsync every
2 min; nats/durable.conf: `sync_interval: always`) in a temporary store directory, creates one
R1 file stream, publishes N messages of SIZE bytes with WINDOW publishes in flight (pipelined,
as the sequencer publishes stamps), and prints msgs/s, p50/p99 ack latency and the command.

    .venv/bin/pip install nats-py==2.16.0     # once
    .venv/bin/python scripts/bench-sync-interval.py [--messages 20000] [--size 256] [--window 64]
"""

import argparse
import asyncio
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import nats

REPO = pathlib.Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_one(conf, args):
    store = tempfile.mkdtemp(prefix="bench-sync-")
    port, mon = free_port(), free_port()
    server = subprocess.Popen(
        [str(REPO / ".venv/bin/nats-server"), "-c", str(REPO / conf), "-sd", store,
         "-a", "127.0.0.1", "-p", str(port), "-m", str(mon)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.>"], storage="file", num_replicas=1)
        payload = os.urandom(args.size // 2).hex().encode()[: args.size]
        sem = asyncio.Semaphore(args.window)
        lat = []

        async def one(i):
            async with sem:
                t = time.perf_counter()
                await js.publish(f"bench.{i % 64}", payload, timeout=30)
                lat.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.messages)))
        took = time.perf_counter() - start
        await nc.close()
        lat.sort()
        return args.messages / took, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(store, ignore_errors=True)


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--window", type=int, default=64)
    args = p.parse_args()
    print(f"command: {' '.join([os.path.relpath(sys.executable, REPO)] + sys.argv)}")
    print(f"messages={args.messages} size={args.size}B window={args.window} R1 file, "
          f"one publisher, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| config | sync_interval | msgs/s | ack p50 ms | ack p99 ms |")
    print("|---|---|---|---|---|")
    for conf, mode in (("nats/dev.conf", "2m (default)"), ("nats/durable.conf", "always")):
        rate, p50, p99 = await run_one(conf, args)
        print(f"| `{conf}` | {mode} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
