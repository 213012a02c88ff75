#!/usr/bin/env python3
"""A TCP relay that adds a fixed one-way delay in each direction (the kernel here has no netem).

Usage: delay-relay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT ONE_WAY_DELAY_MS

Every chunk read from one side is written to the other side DELAY ms later, so a round trip
through the relay gains 2 x DELAY. Bandwidth is not limited here (tc tbf on the veth does that);
in-flight data per direction is capped at 64 MiB so a stalled reader cannot make it grow without
bound. Serves any number of connections until killed.
"""
import asyncio
import sys

CAP = 64 << 20


async def pump(reader, writer, delay):
    loop = asyncio.get_running_loop()
    in_flight = 0
    drained = asyncio.Event()
    drained.set()
    closed = False

    def deliver(chunk):
        nonlocal in_flight
        if not closed:
            writer.write(chunk)
        in_flight -= len(chunk)
        if in_flight < CAP:
            drained.set()

    try:
        while True:
            chunk = await reader.read(256 << 10)
            if not chunk:
                break
            in_flight += len(chunk)
            loop.call_later(delay, deliver, chunk)
            if in_flight >= CAP:
                drained.clear()
                await drained.wait()
            await writer.drain()
        await asyncio.sleep(delay)
    except (ConnectionError, OSError):
        pass
    finally:
        closed = True
        try:
            writer.close()
        except Exception:
            pass


async def main():
    listen_host, listen_port, target_host, target_port, delay_ms = sys.argv[1:6]
    delay = float(delay_ms) / 1000.0

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pump(client_reader, server_writer, delay), pump(server_reader, client_writer, delay))

    server = await asyncio.start_server(handle, listen_host, int(listen_port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
