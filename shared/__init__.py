"""Code shared by the API and the workers: settings, Redis keys, messages, money, errors, schema."""
