"""Generic study steps for any task with a ``Task`` record: 1 filter, 2 intervene, 3 score, 4 report (run in one
process, with the task's extra steps, by the study runner ``experiments.study``)."""
