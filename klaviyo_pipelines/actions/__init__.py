"""One module per Klaviyo (Actions) action; `factory.build_action` picks the one a sync names."""
