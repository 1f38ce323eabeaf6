"""The engine: what runs tasks in one serving process (runtime, slots, supervisor, fork server, task processes,
event hub, hand-over) and the protocol between them."""
