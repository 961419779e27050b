"""The HTTP front end: validates requests, queues operations, answers from the writer's reply."""
