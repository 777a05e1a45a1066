"""A local Event Hubs emulator for tests: an AMQP 1.0 server the real azure-eventhub SDK talks to."""
