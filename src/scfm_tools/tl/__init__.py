"""Tools: tasks that run a model on AnnData and write the results back into it."""
