"""The hand-off from the engine thread to a handler: events posted from another thread while the handler is busy
arrive together and become one chunk; a waiting handler is woken by the future ``post`` hands back (the engine
thread resolves a step's futures in one call into the loop); a disconnect interrupts the wait."""

from __future__ import annotations

import asyncio
import threading

from genarm_local.serve.routes import coalesce
from genarm_local.serve.worker import Failed, Finished, Mailbox, Piece, resolve


def piece(text: str, token: int, logprob: float | None = None) -> Piece:
    if logprob is None:
        return Piece(text, [token])
    return Piece(text, [token], [logprob], [{token: logprob}])


def test_events_posted_while_the_handler_is_busy_arrive_together_and_join():
    async def scenario() -> list:
        mailbox = Mailbox(asyncio.get_running_loop())
        posted = []

        def engine() -> None:  # the handler is not waiting: nobody to wake
            for n in range(3):
                posted.append(mailbox.post(piece(f" w{n}", n, -0.5 * n)))

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()
        assert posted == [None, None, None]
        return await mailbox.receive()

    mail = asyncio.run(scenario())
    assert len(mail) == 3
    (joined,) = coalesce(mail)
    assert joined.text == " w0 w1 w2" and joined.tokens == [0, 1, 2]
    assert joined.logprobs == [0.0, -0.5, -1.0] and joined.top_logprobs == [{0: 0.0}, {1: -0.5}, {2: -1.0}]


def test_pieces_join_up_to_the_end_of_the_reply_only():
    done = Finished("stop", job=None, completion_tokens=2)
    failed = Failed(RuntimeError("decode failed"))
    out = coalesce([piece("a", 1), piece("b", 2), done])
    assert [type(e) for e in out] == [Piece, Finished] and out[0].text == "ab"
    out = coalesce([piece("a", 1), failed, piece("late", 3)])
    assert [type(e) for e in out] == [Piece, Failed, Piece]


def test_a_waiting_handler_is_woken_by_the_future_post_returns():
    async def scenario() -> tuple[list, float]:
        loop = asyncio.get_running_loop()
        mailbox = Mailbox(loop)
        receiving = asyncio.ensure_future(mailbox.receive())
        await asyncio.sleep(0)  # the handler now waits on an empty mailbox
        assert not receiving.done()

        def engine() -> None:
            waiter = mailbox.post(piece("x", 7))
            assert waiter is not None
            assert mailbox.post(piece("y", 8)) is None  # already handed out: one wake-up per wait
            loop.call_soon_threadsafe(resolve, [waiter])

        threading.Thread(target=engine).start()
        return await asyncio.wait_for(receiving, 10)

    mail = asyncio.run(scenario())
    assert [event.text for event in mail] == ["x", "y"]


def test_interrupt_ends_a_wait_with_no_events():
    async def scenario() -> list:
        mailbox = Mailbox(asyncio.get_running_loop())
        receiving = asyncio.ensure_future(mailbox.receive())
        await asyncio.sleep(0)
        mailbox.interrupt()  # the client went away
        return await asyncio.wait_for(receiving, 10)

    assert asyncio.run(scenario()) == []
