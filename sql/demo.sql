-- The demo schema: a settings service and subscription plans, as teams cache them today.
CREATE TABLE user_settings (
    user_id  integer NOT NULL,
    key      text    NOT NULL,
    value    text    NOT NULL,
    PRIMARY KEY (user_id, key)
);

CREATE TABLE plans (
    id        serial  PRIMARY KEY,
    org_slug  text    NOT NULL,
    provider  text    NOT NULL,
    name      text    NOT NULL,
    enabled   boolean NOT NULL DEFAULT true
);
-- Plans move between organisations; the old image must carry org_slug to bust the old lists.
ALTER TABLE plans REPLICA IDENTITY FULL;

CREATE PUBLICATION walbust FOR TABLE user_settings, plans;

-- The rows the application has been serving from its cache.
INSERT INTO user_settings VALUES
    (1, 'theme', 'dark'), (1, 'locale', 'fr'), (1, 'timezone', 'Europe/Paris'),
    (2, 'theme', 'light'), (2, 'locale', 'de');
INSERT INTO plans (org_slug, provider, name) VALUES
    ('acme', 'stripe', 'Basic'), ('acme', 'stripe', 'Pro'), ('acme', 'stripe', 'Enterprise'),
    ('acme', 'paddle', 'Team'), ('globex', 'stripe', 'Growth'), ('initech', 'paddle', 'Starter');
