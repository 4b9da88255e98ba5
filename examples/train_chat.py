"""Instruction / chat variant: train a NOLA adapter on conversations in JSON lines, then save, reload and export it.

    python examples/train_chat.py --train_file chats.jsonl

Each line holds ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``, the
format of chat datasets on the hub. The tokenizer's chat template renders each conversation; the loss covers the
assistant turns only. Same options and outputs as train_on_your_data.py.
"""

import argparse
from pathlib import Path

from train_on_your_data import common_arguments, load_tokenizer, read_jsonl, train_save_reload_export


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Token ids of the whole conversation; labels are -100 except on the assistant turns.

    Each assistant turn's tokens are found by rendering the conversation up to the turn with and without it: the
    template renders a prefix of a conversation as a prefix of its tokens (checked here, as templates may not)."""
    input_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    labels = [-100] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=True)["input_ids"]
        if input_ids[:len(through)] != through or through[:len(before)] != before:
            raise SystemExit("this tokenizer's chat template does not render a conversation's prefix as a prefix")
        labels[len(before):len(through)] = through[len(before):]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def main(argv=None) -> None:
    here = Path(__file__).parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_file", default=str(here / "data" / "chat.jsonl"), help="JSON lines with 'messages'")
    common_arguments(parser)
    args = parser.parse_args(argv)

    rows = read_jsonl(args.train_file, ["messages"])
    tokenizer = load_tokenizer(args.model)
    if tokenizer.chat_template is None:
        raise SystemExit(f"{args.model}'s tokenizer has no chat template: use train_on_your_data.py instead")
    examples = [encode_conversation(tokenizer, r["messages"], args.max_length) for r in rows]
    # Prompts for the demonstration after training: each conversation up to its first assistant turn.
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    train_save_reload_export(args, tokenizer, examples, prompts)


if __name__ == "__main__":
    main()
