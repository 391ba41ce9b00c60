"""Sans-I/O core of novagate: client messages, Nova Sonic events, history shaping, event-order rules
and the conversation state machine. Nothing here touches sockets, tasks or clocks."""
