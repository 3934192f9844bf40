"""The hospital agent: a long-running service that takes part in the rounds the server opens.

``rules``   what the hospital allows (``[agent]``: window, rounds per day, attempts per
            version, the cross-round rule) and the agent's durable record (``agent.json``)
``control`` the local Unix-domain socket through which the app and the CLI talk to it
``service`` the service itself (``securefl client --config hospital.toml agent``)
"""
