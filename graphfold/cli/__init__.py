"""The ``graphfold`` command (``command``), the demo, and how progress and reports are shown on
a terminal (``heartbeat``, ``render``). May import every layer."""
