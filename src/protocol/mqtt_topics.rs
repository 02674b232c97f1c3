//! MQTT topic names of the Arklet protocol: `koupleless_<env>/<id>/...`.

/// Base → controller message kinds, by topic suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpTopic {
    /// `base/heart`
    Heart,
    /// `base/queryBaseline`
    QueryBaseline,
    /// `base/health`
    Health,
    /// `base/simpleBiz`
    SimpleBiz,
    /// `base/biz` (legacy)
    Biz,
    /// `base/bizOperation`
    BizOperation,
    /// `base/batchInstallBizResponse`
    BatchInstallResponse,
}

impl UpTopic {
    /// Every kind, for subscriptions.
    pub const ALL: [UpTopic; 7] = [
        UpTopic::Heart,
        UpTopic::QueryBaseline,
        UpTopic::Health,
        UpTopic::SimpleBiz,
        UpTopic::Biz,
        UpTopic::BizOperation,
        UpTopic::BatchInstallResponse,
    ];

    /// The topic suffix after `<id>/`.
    pub fn suffix(self) -> &'static str {
        match self {
            UpTopic::Heart => "base/heart",
            UpTopic::QueryBaseline => "base/queryBaseline",
            UpTopic::Health => "base/health",
            UpTopic::SimpleBiz => "base/simpleBiz",
            UpTopic::Biz => "base/biz",
            UpTopic::BizOperation => "base/bizOperation",
            UpTopic::BatchInstallResponse => "base/batchInstallBizResponse",
        }
    }

    /// Whether messages older than the staleness window must be dropped.
    pub fn staleness_checked(self) -> bool {
        matches!(
            self,
            UpTopic::Heart
                | UpTopic::QueryBaseline
                | UpTopic::Health
                | UpTopic::SimpleBiz
                | UpTopic::Biz
        )
    }
}

/// Controller → base command topics, by suffix after `<id>/`.
pub mod down {
    /// Ask for health.
    pub const HEALTH: &str = "health";
    /// Ask for the full module list.
    pub const QUERY_ALL_BIZ: &str = "queryAllBiz";
    /// Install a module.
    pub const INSTALL_BIZ: &str = "installBiz";
    /// Uninstall a module.
    pub const UNINSTALL_BIZ: &str = "uninstallBiz";
    /// Baseline (bare JSON array).
    pub const BASELINE: &str = "base/baseline";
}

/// Topic prefix for an env: `koupleless_<env>`.
pub fn prefix(env: &str) -> String {
    format!("koupleless_{}", env.to_ascii_lowercase())
}

/// Full topic `koupleless_<env>/<id>/<suffix>`.
pub fn topic(env: &str, base_id: &str, suffix: &str) -> String {
    format!("{}/{}/{}", prefix(env), base_id, suffix)
}

/// Controller subscription filter for one kind of up message from every base of `env`.
pub fn subscription(env: &str, kind: UpTopic) -> String {
    format!("{}/+/{}", prefix(env), kind.suffix())
}

/// Parses a command topic (`installBiz`, `uninstallBiz`) into (base id, suffix): replicas
/// sharing the bases watch each other's commands so that a takeover sends none twice.
pub fn parse_command(env: &str, topic: &str) -> Option<(String, &'static str)> {
    let rest = topic.strip_prefix(&prefix(env))?.strip_prefix('/')?;
    let (id, suffix) = rest.split_once('/')?;
    if id.is_empty() || id.contains(['+', '#']) {
        return None;
    }
    [down::INSTALL_BIZ, down::UNINSTALL_BIZ]
        .into_iter()
        .find(|s| *s == suffix)
        .map(|s| (id.to_string(), s))
}

/// Parses an up topic into (base id, kind); `None` for another env or an unknown suffix.
pub fn parse_up(env: &str, topic: &str) -> Option<(String, UpTopic)> {
    let rest = topic.strip_prefix(&prefix(env))?.strip_prefix('/')?;
    let (id, suffix) = rest.split_once('/')?;
    if id.is_empty() || id.contains(['+', '#']) {
        return None;
    }
    let kind = UpTopic::ALL.into_iter().find(|k| k.suffix() == suffix)?;
    Some((id.to_string(), kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_with_dots() {
        assert_eq!(
            parse_up("dev", "koupleless_dev/10.0.0.1/base/heart"),
            Some(("10.0.0.1".to_string(), UpTopic::Heart))
        );
        assert_eq!(
            parse_up("dev", "koupleless_dev/b1/base/bizOperation"),
            Some(("b1".to_string(), UpTopic::BizOperation))
        );
    }

    #[test]
    fn rejects_other_env_and_unknown_suffix() {
        assert_eq!(parse_up("dev", "koupleless_prod/b1/base/heart"), None);
        assert_eq!(parse_up("dev", "koupleless_dev/b1/base/nope"), None);
        assert_eq!(parse_up("dev", "koupleless_devx/b1/base/heart"), None);
        assert_eq!(parse_up("dev", "koupleless_dev//base/heart"), None);
    }

    #[test]
    fn builds_topics() {
        assert_eq!(
            topic("Dev", "b1", down::INSTALL_BIZ),
            "koupleless_dev/b1/installBiz"
        );
        assert_eq!(
            subscription("dev", UpTopic::Health),
            "koupleless_dev/+/base/health"
        );
    }
}
