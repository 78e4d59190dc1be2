"""Structured output: the reply comes back as a validated pydantic object.

``with_structured_output`` forces a tool call whose arguments follow the schema and
retries (sampling) when they do not validate.

Run:  python examples/structured_output.py [--model NAME] [--config config/x.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import BaseModel, Field

from langchain_infllm import ChatInfLLM

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="The person's full name")
    age: int = Field(description="Age in years")
    city: str = Field(description="City the person lives in")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default=str(CONFIG_DIR / "cpu-small.yaml"))
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    chat = ChatInfLLM(model=args.model, infllm_config=args.config, max_tokens=args.max_tokens)
    extractor = chat.with_structured_output(Person)
    text = "Maria Garcia is 34 years old and lives in Madrid, where she teaches chemistry."
    person = extractor.invoke(f"Extract the person from this text: {text}")
    assert isinstance(person, Person)
    print("parsed:", repr(person))
    print("json:", person.model_dump_json())


if __name__ == "__main__":
    main()
