"""Wire-level stand-ins for the AWS services, shipped with novagate (`novagate emulate ...`)."""
