"""A desktop chat window on genarm-local's Python API, with the standard library's Tkinter: each message is answered
twice, side by side, by the base alone (every ARM weight 0) and guided by the ARMs at the sliders' weights, with the
same seed, so the difference between the panes is the guidance.

    python examples/desktop_chat.py                                  # the embedded Gemma-3-270M, shipped ARMs
    python examples/desktop_chat.py --base base.gguf --arm arm.gguf:1.5 --arm other.gguf

Threads: Tk may only be touched from the main thread, and its main loop must never wait on the model. Each reply is
read by a worker thread from its Stream and handed to the window through a queue that the main loop polls with
``after``. Stop sets the turn's cancel event (the API's ``cancel=``), which ends both replies within one decode step;
closing the window closes the model, which ends whatever is still running, so the window never waits for a reply.

``--script PROMPT`` drives the window as a user would, for the test and the README's screenshot: it types PROMPT,
presses Send, presses Stop (``--stop-after N``) or closes the window (``--close-after N``) once both panes show N
pieces of text, optionally saves a screenshot, prints what the panes show as one JSON line, and quits.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import tkinter as tk

from genarm_local import ArmSpec, GenArmError, GuidedModel

PANES = ("base", "guided")
POLL_MS = 30


class ChatWindow:
    """Sliders for the ARMs' weights, a base pane and a guided pane, a prompt entry with Send and Stop. Each pane is
    its own conversation: the base's history holds the base's replies, the guided one the guided replies."""

    def __init__(self, root: tk.Tk, model: GuidedModel, max_tokens: int, seed: int):
        self.root, self.model, self.max_tokens, self.seed = root, model, max_tokens, seed
        self.histories: dict[str, list[dict]] = {pane: [] for pane in PANES}
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # (pane, kind, value) from the workers
        self.cancel = threading.Event()
        self.workers: list[threading.Thread] = []
        self.running: set[str] = set()
        self.pieces = dict.fromkeys(PANES, 0)  # pieces of text shown in this turn, per pane
        self.finish_reasons: dict[str, str | None] = {}
        self.build()
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.after(POLL_MS, self.poll)

    def build(self) -> None:
        self.root.title("genarm-local: base vs guided")
        sliders = tk.Frame(self.root, padx=8, pady=4)
        sliders.pack(fill=tk.X)
        self.sliders: dict[str, tk.Scale] = {}
        for name, alpha in self.model.arm_weights().items():
            scale = tk.Scale(sliders, label=f"ARM {name}: α", from_=-2, to=3, resolution=0.01, length=220)
            scale.configure(orient=tk.HORIZONTAL)
            scale.set(alpha)
            scale.pack(side=tk.LEFT, padx=6)
            self.sliders[name] = scale
        if not self.sliders:
            tk.Label(sliders, text="no ARM loaded: both panes are the base").pack(side=tk.LEFT)

        panes = tk.Frame(self.root, padx=8)
        panes.pack(fill=tk.BOTH, expand=True)
        self.panes: dict[str, tk.Text] = {}
        titles = {"base": "base alone (all weights 0)", "guided": "guided (the sliders' weights)"}
        for column, pane in enumerate(PANES):
            tk.Label(panes, text=titles[pane], font=("TkDefaultFont", 11, "bold")).grid(row=0, column=column)
            text = tk.Text(panes, wrap=tk.WORD, width=56, height=16, padx=6, pady=6, font="TkTextFont")
            text.configure(state=tk.DISABLED)
            text.tag_configure("user", font=("TkDefaultFont", 10, "bold"))
            text.tag_configure("note", foreground="#a33")
            text.grid(row=1, column=column, sticky="nsew", padx=4)
            panes.columnconfigure(column, weight=1)
            self.panes[pane] = text
        panes.rowconfigure(1, weight=1)

        bar = tk.Frame(self.root, padx=8, pady=8)
        bar.pack(fill=tk.X, side=tk.BOTTOM, before=panes)  # packed before the panes: a small window shrinks them
        self.entry = tk.Entry(bar)
        self.entry.pack(side=tk.LEFT, fill=tk.X, expand=True)
        self.entry.bind("<Return>", lambda _: self.send())
        self.send_button = tk.Button(bar, text="Send", command=self.send)
        self.send_button.pack(side=tk.LEFT, padx=4)
        self.stop_button = tk.Button(bar, text="Stop", command=self.stop, state=tk.DISABLED)
        self.stop_button.pack(side=tk.LEFT)
        self.entry.focus_set()

    # ---- a turn: Send starts one worker per pane, the main loop shows what they put on the queue ----------------

    def send(self) -> None:
        prompt = self.entry.get().strip()
        if not prompt or self.running:
            return
        self.entry.delete(0, tk.END)
        guided = {name: float(scale.get()) for name, scale in self.sliders.items()}
        weights = {"base": dict.fromkeys(guided, 0.0), "guided": guided}
        self.cancel = threading.Event()  # one per turn: Stop ends this turn's replies, not the next ones
        self.pieces = dict.fromkeys(PANES, 0)
        self.finish_reasons = {}
        for pane in PANES:
            self.histories[pane].append({"role": "user", "content": prompt})
            self.write(pane, f"You: {prompt}\n", "user")
            messages = list(self.histories[pane])
            worker = threading.Thread(target=self.reply, args=(pane, messages, weights[pane], self.cancel), daemon=True)
            worker.start()
            self.workers.append(worker)
        self.running = set(PANES)
        self.send_button.configure(state=tk.DISABLED)
        self.stop_button.configure(state=tk.NORMAL)

    def reply(self, pane: str, messages: list[dict], weights: dict, cancel: threading.Event) -> None:
        """Worker thread: stream one reply onto the queue. Touches no widget."""
        try:
            stream = self.model.chat(
                messages, weights=weights, cancel=cancel, stream=True, max_tokens=self.max_tokens, seed=self.seed
            )
            for response in stream:
                if response.text:
                    self.events.put((pane, "text", response.text))
            self.events.put((pane, "done", stream.result))
        except GenArmError as exc:  # e.g. the conversation outgrew the context, or the model was closed
            self.events.put((pane, "error", str(exc)))

    def poll(self) -> None:
        while True:
            try:
                pane, kind, value = self.events.get_nowait()
            except queue.Empty:
                break
            if kind == "text":
                self.show_piece(pane, value)
            else:
                self.finish(pane, kind, value)
        self.root.after(POLL_MS, self.poll)

    def show_piece(self, pane: str, piece: str) -> None:
        if self.pieces[pane] == 0:
            piece = piece.lstrip()  # replies often start with a space; the history keeps it
        if piece:
            self.pieces[pane] += 1
            self.write(pane, piece)

    def finish(self, pane: str, kind: str, value) -> None:
        if kind == "done":  # value: the stream's GenerationResult, complete
            self.histories[pane].append({"role": "assistant", "content": value.text})
            self.finish_reasons[pane] = value.finish_reason
            stopped = value.finish_reason == "cancelled"
            self.write(pane, " [stopped]\n\n" if stopped else "\n\n", "note")
        else:
            self.histories[pane].pop()  # the turn never happened
            self.finish_reasons[pane] = "error"
            self.write(pane, f"[error: {value}]\n\n", "note")
        self.running.discard(pane)
        if not self.running:
            self.send_button.configure(state=tk.NORMAL)
            self.stop_button.configure(state=tk.DISABLED)

    def stop(self) -> None:
        self.cancel.set()

    def close(self) -> None:
        """Window closed: end the replies and close the model (it waits at most for the decode step in progress),
        let the workers see their streams end, then destroy the window."""
        self.cancel.set()
        self.model.close()
        for worker in self.workers:
            worker.join(timeout=10)
        self.root.destroy()

    # ---- the panes -------------------------------------------------------------------------------------------------

    def write(self, pane: str, text: str, tag: str = "") -> None:
        widget = self.panes[pane]
        widget.configure(state=tk.NORMAL)
        widget.insert(tk.END, text, tag)
        widget.configure(state=tk.DISABLED)
        widget.see(tk.END)

    def shown(self, pane: str) -> str:
        return self.panes[pane].get("1.0", "end-1c")


# ---- --script: the test's and the README screenshot's user -------------------------------------------------------


def run_script(window: ChatWindow, args: argparse.Namespace) -> None:
    """Type the prompt and press Send; once both panes show ``after`` pieces, press Stop (and wait for the replies
    to end) or close the window; save the screenshot, print what the panes show as one JSON line, and quit."""
    after = args.stop_after if args.stop_after is not None else args.close_after

    def steps():
        window.entry.insert(0, args.script)
        window.send_button.invoke()
        while window.running and min(window.pieces.values()) < (after or 0):
            yield
        if args.close_after is not None:
            window.close()
            print(json.dumps({"closed": True, "workers_alive": sum(w.is_alive() for w in window.workers)}))
            return
        if after and window.running:
            window.stop_button.invoke()
        while window.running:
            yield
        window.root.update()  # paint the last pieces before the screenshot
        if args.screenshot:
            save_screenshot(window.root, args.screenshot)
        panes = {pane: {"shown": window.shown(pane), "pieces": window.pieces[pane]} for pane in PANES}
        for pane in PANES:
            panes[pane]["finish_reason"] = window.finish_reasons[pane]
        weights = {name: float(scale.get()) for name, scale in window.sliders.items()}
        controls = all(w.winfo_ismapped() for w in (window.entry, window.send_button, window.stop_button))
        print(json.dumps({"panes": panes, "weights": weights, "controls_shown": controls}))
        window.close()

    plan = steps()

    def tick() -> None:
        if next(plan, StopIteration) is not StopIteration:
            window.root.after(POLL_MS, tick)

    window.root.after(200, tick)


def save_screenshot(root: tk.Tk, path: str) -> None:
    """The window's pixels from the X server (Pillow's ImageGrab; Tk cannot read its own pixels back)."""
    from PIL import ImageGrab

    x, y = root.winfo_rootx(), root.winfo_rooty()
    box = (x, y, x + root.winfo_width(), y + root.winfo_height())
    ImageGrab.grab(bbox=box, xdisplay=root.winfo_screen()).save(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", help="base GGUF (default: the embedded Gemma-3-270M, with the shipped ARMs)")
    p.add_argument("--arm", action="append", default=[], metavar="PATH[:ALPHA]", help="an ARM to load (repeatable)")
    p.add_argument("--max-tokens", type=int, default=200, help="longest reply in tokens (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="the seed of both replies (default: 0)")
    p.add_argument("--script", metavar="PROMPT", help="send PROMPT, print what the panes show as JSON, quit")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--stop-after", type=int, metavar="N", help="with --script: press Stop after N pieces")
    when.add_argument("--close-after", type=int, metavar="N", help="with --script: close the window after N pieces")
    p.add_argument("--screenshot", metavar="PNG", help="with --script: save the window as PNG before quitting")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        arms = [ArmSpec.parse(spec) for spec in args.arm] or None
        model = GuidedModel(args.base, arms, seed=args.seed)
    except GenArmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        root = tk.Tk()
        root.geometry("1100x480")
        window = ChatWindow(root, model, args.max_tokens, args.seed)
        if args.script:
            run_script(window, args)
        root.mainloop()
    finally:
        model.close()  # also when Tk fails to start (no display); a second close() does nothing
    return 0


if __name__ == "__main__":
    sys.exit(main())
