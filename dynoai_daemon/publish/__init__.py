"""Publishing: topic names and payload encoding, the durable outbox, MQTT and commands.

``topics`` builds every topic of docs/contract.md and holds their retain/QoS table; ``outbox``
keeps alerts and sessions in SQLite until the broker acknowledged them; ``mqtt`` is the
reconnecting publisher that drains it; ``commands`` validates and answers requests. The
MQTT module imports aiomqtt, so it is not imported here: import
``dynoai_daemon.publish.mqtt`` where a connection is needed.
"""

from dynoai_daemon.publish.outbox import Outbox, OutboxMessage
from dynoai_daemon.publish.topics import TOPIC_TABLE, Topics, TopicSpec, encode_payload

__all__ = ["TOPIC_TABLE", "Outbox", "OutboxMessage", "TopicSpec", "Topics", "encode_payload"]
