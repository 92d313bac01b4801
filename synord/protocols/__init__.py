"""What crosses the wire: identities, envelopes, message schemas, topics and
the sans-IO protocol state machines. Nothing here knows about sandboxes or the
daemon; `synord` builds on it."""
