"""Long-horizon demo agents on ``langchain.agents.create_agent`` with ``ChatInfLLM``.

* :mod:`agents.document_reader`: reads a generated report page by page, then answers
  questions whose answers sit on pages far outside the engine's attention span.
* :mod:`agents.repo_investigator`: lists, reads and greps a generated repository, then
  answers questions about files read many steps earlier.

Each module ships a seeded generator, a scorer and a CLI (``python -m agents.<name>``);
:mod:`agents.common` holds the shared argument parsing, run loop and reporting.
"""
