"""Generic study steps for any task with a ``Task`` record: 1 filter, 2 intervene, 3 score."""
