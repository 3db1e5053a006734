"""`genarm-local chat`: a guided chat in the terminal, streamed, with live ARM weights.

The history stays in the model's contexts between turns (GuidedModel.chat decodes only what follows the cached
prefix). Ctrl-C during a reply stops that reply — a SIGINT handler sets the threading.Event passed as ``cancel``,
the engine checks it before each token — and the partial reply is kept, marked interrupted. Ctrl-C or Ctrl-D at
the prompt ends the session. With stdin not a terminal each line is one turn, so sessions can be scripted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import textwrap
import threading
from pathlib import Path

from ..core.api import GuidedModel
from ..core.atomic import atomic_output
from ..core.config import ArmSpec
from ..core.errors import ChatTemplateError, ContextOverflowError, GenArmError, InvalidOptionError
from ..core.preferences import DEFAULT_PATH, append_preference, preference_row, preferences_path
from .flags import (
    add_model_arguments,
    add_sampling_arguments,
    arm_lines,
    load_model,
    note,
    sampling_options,
    timings_line,
)

COMMANDS = """  /weights [NAME=ALPHA ...]  show or change ARM weights (0 switches an ARM off; a negative α steers away:
                             positive=-1 writes less positively)
  /temp [T]                  show or change the temperature
  /system [TEXT]             set (or clear) the system prompt; starts a new conversation
  /reset                     forget the conversation (the system prompt stays)
  /prefer base|guided        with --compare: keep the better reply of the last turn, as a
                             preference pair in the --prefs file (genarm-local train --data)
  /load PATH[:ALPHA]         load one more ARM into this chat (e.g. one just trained)
  /save FILE                 write the transcript as JSON
  /help                      this list
  /quit                      leave (also Ctrl-D, or Ctrl-C at the prompt)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "commands in the chat:\n" + COMMANDS
    parser.add_argument("-sys", "--system-prompt", help="system message at the start of the conversation")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print timings after each reply (prompt and gen tok/s)"
    )
    parser.add_argument(
        "--compare", action="store_true", help="each turn also shows the unguided base reply (all ARM weights 0)"
    )
    parser.add_argument(
        "--compare-layout", choices=["stacked", "side"], default="stacked",
        help="with --compare: one reply after the other (streamed) or side by side",
    )  # fmt: skip
    parser.add_argument(
        "--prefs", metavar="FILE", default=DEFAULT_PATH,
        help="where /prefer appends its preference pairs (JSONL, TRL's conversational format)",
    )  # fmt: skip
    add_model_arguments(parser)
    add_sampling_arguments(parser, exclude=("logprobs",))


class ChatSession:
    """One conversation: history, live weights and sampling, the slash commands, and the replies."""

    def __init__(self, model: GuidedModel, sampling: dict, system: str | None, args: argparse.Namespace, out=None):
        self.model = model
        self.sampling = sampling
        self.system = system
        self.weights = model.arm_weights()
        self.verbose, self.compare, self.layout = args.verbose, args.compare, args.compare_layout
        self.prefs = preferences_path(args.prefs)
        self.preferred = 0  # pairs recorded in this session
        self.out = out or sys.stdout
        self.messages: list[dict] = []
        self.commands = {
            "/weights": self.set_weights,
            "/temp": self.set_temperature,
            "/system": self.set_system,
            "/reset": self.reset,
            "/prefer": self.prefer,
            "/load": self.load_arm,
            "/save": self.save,
            "/help": lambda _: self.note(f"commands:\n{COMMANDS}\npreferences go to {self.prefs}"),
        }

    # ---- slash commands ------------------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        note(text)

    def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        run = self.commands.get(name.lower())
        if run is None:
            self.note(f"unknown command {name}; /help lists the commands")
            return
        try:
            run(rest.strip())
        except GenArmError as exc:
            self.note(f"{name}: {exc}")

    def set_weights(self, rest: str) -> None:
        if rest:
            named = {}
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                try:
                    named[name] = float(value)
                except ValueError:
                    raise InvalidOptionError(f"write NAME=ALPHA with a number, got {item!r}") from None
                if not sep:
                    raise InvalidOptionError(f"write NAME=ALPHA, got {item!r}")
            self.model.arm_weights(named)  # unknown names are refused before anything changes
            self.weights.update(named)
        shown = " ".join(f"{name}={alpha:.3g}" for name, alpha in self.weights.items())
        self.note("\n".join([f"weights: {shown or 'none (no ARM loaded)'}", *arm_lines(self.model, self.weights)]))

    def set_temperature(self, rest: str) -> None:
        if rest:
            try:
                self.sampling["temperature"] = float(rest)
            except ValueError:
                raise InvalidOptionError(f"the temperature must be a number, got {rest!r}") from None
        self.note(f"temperature: {self.sampling['temperature']:g}")

    def set_system(self, rest: str) -> None:
        self.system = rest or None
        self.messages = []
        self.note(f"system prompt {'set' if rest else 'cleared'}; new conversation")

    def reset(self, _: str) -> None:
        self.messages = []
        self.note("new conversation")

    def prefer(self, rest: str) -> None:
        if not self.compare:
            raise InvalidOptionError(
                "start the chat with --compare: /prefer chooses between the base and guided replies"
            )
        choice = rest.lower()
        if choice not in ("base", "guided"):
            raise InvalidOptionError(f"write /prefer base or /prefer guided, got {rest!r}")
        last = self.messages[-1] if self.messages else {}
        if "base_reply" not in last:
            raise InvalidOptionError("no reply to prefer yet: send a message first")
        if "preferred" in last:
            raise InvalidOptionError(f"the last turn is already recorded ({last['preferred']} preferred)")
        if last.get("interrupted") or last.get("base_interrupted"):
            raise InvalidOptionError("a reply of the last turn was interrupted; only whole replies make a preference")
        replies = {"base": last["base_reply"], "guided": last["content"]}
        other = "guided" if choice == "base" else "base"
        path = append_preference(self.prefs, preference_row(self.history()[:-1], replies[choice], replies[other]))
        last["preferred"] = choice
        self.preferred += 1
        if self.preferred == 1:
            self.note(f"{choice} preferred; preference pairs go to {path} (train on them: genarm-local train --data)")
        else:
            self.note(f"{choice} preferred ({self.preferred} pairs recorded in this chat)")

    def load_arm(self, rest: str) -> None:
        if not rest:
            raise InvalidOptionError("give an ARM file: /load PATH[:ALPHA] (or NAME=PATH[:ALPHA])")
        spec = self.model.load_arm(ArmSpec.parse(rest, option=None))
        self.weights[spec.name] = self.model.arm_weights()[spec.name]
        self.note(f"loaded ARM {spec.name} from {spec.path}")
        self.set_weights("")

    def save(self, rest: str) -> None:
        if not rest:
            raise InvalidOptionError("give a file name: /save FILE")
        transcript = {
            "base": str(self.model.engine.base_model.path),
            "arms": {arm.name: str(arm.path) for arm in self.model.arms},
            "weights": self.weights,
            "sampling": self.sampling,
            "messages": self.history(keep_marks=True),
        }
        path = Path(rest).expanduser()
        try:
            with atomic_output(path, force=True) as tmp:  # a transcript is complete or not there
                tmp.write_text(json.dumps(transcript, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise InvalidOptionError(f"cannot write {path}: {exc.strerror}") from None
        self.note(f"saved {len(self.messages)} messages to {path}")

    # ---- turns ---------------------------------------------------------------------------------------------------

    def history(self, keep_marks: bool = False) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        if keep_marks:
            return system + self.messages
        return system + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def turn(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        cancels: list[threading.Event] = []  # one per reply: Ctrl-C stops the reply being written, not the next
        previous = signal.signal(signal.SIGINT, lambda *_: cancels[-1].set() if cancels else None)
        try:
            base_reply = self.compare_reply(cancels) if self.compare else None
            reply = self.reply(self.weights, cancels, "guided" if self.compare else None)
        except GenArmError:
            self.messages.pop()  # the turn never happened: e.g. the history outgrew the context
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
        message = {"role": "assistant", "content": reply.text}
        if reply.finish_reason == "cancelled":
            message["interrupted"] = True
        if base_reply is not None:
            message["base_reply"] = base_reply.text
            if base_reply.finish_reason == "cancelled":
                message["base_interrupted"] = True
        self.messages.append(message)
        if self.compare and self.layout == "side":
            self.side_by_side(base_reply, reply)

    def compare_reply(self, cancels: list[threading.Event]):
        """The unguided reply first, so the contexts' caches end on the guided history the next turn extends."""
        return self.reply({name: 0.0 for name in self.weights}, cancels, "base")

    def reply(self, weights: dict, cancels: list[threading.Event], label: str | None):
        # As GuidedModel.chat; a reply ends at max_tokens or where the conversation fills the context (-c).
        prompt = self.model.chat_prompt(self.history())
        cancels.append(threading.Event())
        pieces = self.model.stream(prompt.tokens, weights=weights, cancel=cancels[-1], **prompt.sampling(self.sampling))
        streamed = not (self.compare and self.layout == "side")
        if streamed and label:
            self.out.write(f"[{label}] ")
        shown = False  # shown without the whitespace a model often starts a reply with; the history keeps it
        for response in pieces:
            piece = response.text
            if streamed and (shown or piece.strip()):
                self.out.write(piece if shown else piece.lstrip())
                self.out.flush()
                shown = True
        result = pieces.result
        if streamed:
            self.out.write(" [interrupted]\n" if result.finish_reason == "cancelled" else "\n")
            self.out.flush()
        if self.verbose:
            self.note(timings_line(result))
        return result

    def side_by_side(self, base_reply, reply) -> None:
        width = max(20, (shutil.get_terminal_size().columns - 3) // 2)
        columns = []
        for label, result in (("base", base_reply), ("guided", reply)):
            mark = " [interrupted]" if result.finish_reason == "cancelled" else ""
            lines = [f"[{label}]"]
            for paragraph in (result.text.lstrip() + mark).splitlines() or [""]:
                lines += textwrap.wrap(paragraph, width) or [""]
            columns.append(lines)
        for left, right in zip(*(c + [""] * (max(map(len, columns)) - len(c)) for c in columns), strict=True):
            self.out.write(f"{left:<{width}} | {right}\n")
        self.out.flush()


def read_line(interactive: bool) -> str | None:
    """The next input line, or None at the end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def run(session: ChatSession, interactive: bool) -> None:
    if interactive:
        session.note("genarm-local chat: /help lists the commands; Ctrl-C stops a reply, Ctrl-D leaves")
    while True:
        try:
            line = read_line(interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave cleanly
            print(file=sys.stderr)
            return
        if line is None or line.strip().lower() in ("/quit", "/exit", "/bye"):
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            session.command(line.strip())
            continue
        try:
            session.turn(line)
        except ContextOverflowError as exc:
            session.note(f"error: {exc}; /reset starts a new conversation")
        except ChatTemplateError:
            raise  # no turn can be rendered: the session cannot go on
        except GenArmError as exc:
            session.note(f"error: {exc}")


def main(args: argparse.Namespace) -> None:
    sampling = sampling_options(args)
    preferences_path(args.prefs)  # a folder that does not exist fails now, not at the first /prefer
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    with load_model(args) as model:
        if args.compare and not model.arms:
            raise InvalidOptionError("--compare needs at least one --arm: without ARMs both replies are the base's")
        if model.chat_template.kind == "plain" and args.chat_template is None:
            note(
                f"genarm-local: {model.engine.base_model.path.name} has no chat template (a pretrained base); chatting "
                "through a plain User:/Assistant: transcript (--chat-template NAME|FILE chooses another)"
            )
        model.check_chat_template()  # a broken or hostile template fails here, before the first turn
        if args.verbose and model.arms:
            note("ARMs:\n" + "\n".join(arm_lines(model, model.arm_weights())))
        run(ChatSession(model, sampling, args.system_prompt, args), interactive)
