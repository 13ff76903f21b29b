//! What Go Flannel leaves behind: since v0.27.0 it keeps its rules at exit (to spare traffic
//! while its pod restarts) and cleans them at its next start. A node that moves to us never
//! has that next start, so we remove them once at ours: the nftables tables `ip flannel-ipv4`
//! and `ip6 flannel-ipv6`, and the iptables chains `FLANNEL-POSTRTG` (nat) and `FLANNEL-FWD`
//! (filter) with the jumps to them. Nothing else is touched: other rules in POSTROUTING and
//! FORWARD stay, and so do tables and chains of other names.

use super::{has, output, run};

/// Go Flannel's nftables tables, by family.
const GO_TABLES: [(&str, &str); 2] = [("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")];
/// Go Flannel's iptables chains: (table, parent chain, chain).
const GO_CHAINS: [(&str, &str, &str); 2] = [
    ("nat", "POSTROUTING", "FLANNEL-POSTRTG"),
    ("filter", "FORWARD", "FLANNEL-FWD"),
];

/// Removes Go Flannel's leftover tables and chains; returns what was removed, for the log.
/// A tool that is missing has nothing of Go's to remove; a failing step is reported in the
/// list and stops nothing.
pub async fn remove_go_flannel_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    if has("nft").await.unwrap_or(false) {
        for (family, table) in GO_TABLES {
            if output("nft", &["list", "table", family, table])
                .await
                .is_empty()
            {
                continue;
            }
            match run("nft", &["delete", "table", family, table], None).await {
                Ok(()) => removed.push(format!("nftables table {family} {table}")),
                Err(e) => removed.push(format!("(failed) nftables table {family} {table}: {e:#}")),
            }
        }
    }
    for bin in ["iptables", "ip6tables"] {
        if !has(bin).await.unwrap_or(false) {
            continue;
        }
        for (table, parent, chain) in GO_CHAINS {
            let exists = !output(bin, &["-w", "-t", table, "-S", chain])
                .await
                .is_empty();
            let jumps = jumps_to(
                &output(bin, &["-w", "-t", table, "-S", parent]).await,
                parent,
                chain,
            );
            if !exists && jumps.is_empty() {
                continue;
            }
            for rule in &jumps {
                let mut args = vec!["-w", "-t", table, "-D", parent];
                args.extend(rule.iter().map(String::as_str));
                if let Err(e) = run(bin, &args, None).await {
                    removed.push(format!("(failed) {bin} -t {table} jump to {chain}: {e:#}"));
                }
            }
            let _ = run(bin, &["-w", "-t", table, "-F", chain], None).await;
            match run(bin, &["-w", "-t", table, "-X", chain], None).await {
                Ok(()) => removed.push(format!("{bin} {table} chain {chain}")),
                Err(e) if exists => {
                    removed.push(format!("(failed) {bin} {table} chain {chain}: {e:#}"))
                }
                Err(_) => {}
            }
        }
    }
    removed
}

/// The rule specs (after `-A <parent>`) of `parent`'s rules that jump to `chain`, from
/// `iptables -S <parent>` output, split into arguments as the shell would.
fn jumps_to(listing: &str, parent: &str, chain: &str) -> Vec<Vec<String>> {
    let prefix = format!("-A {parent} ");
    listing
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(shell_words)
        .filter(|words| words.windows(2).any(|w| w[0] == "-j" && w[1] == chain))
        .collect()
}

/// Splits an `iptables -S` rule into arguments: words separated by spaces, with double quotes
/// around words that hold spaces (comments) and backslash escapes inside them.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            _ => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_with_go_flannels_comments_are_found_whole() {
        let listing = "-P POSTROUTING ACCEPT\n\
            -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
            -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
            -A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE\n\
            -A POSTROUTING -j FLANNEL-POSTRTG\n";
        assert_eq!(
            jumps_to(listing, "POSTROUTING", "FLANNEL-POSTRTG"),
            vec![
                vec![
                    "-m",
                    "comment",
                    "--comment",
                    "flanneld masq",
                    "-j",
                    "FLANNEL-POSTRTG"
                ],
                vec!["-j", "FLANNEL-POSTRTG"],
            ]
        );
        // Someone else's chain whose name starts like Go's is not Go's.
        assert!(jumps_to("-A FORWARD -j FLANNEL-FWD-MINE\n", "FORWARD", "FLANNEL-FWD").is_empty());
    }

    #[test]
    fn quoted_words_keep_spaces_and_escapes() {
        assert_eq!(
            shell_words(r#"-m comment --comment "a \"b\" c" -j X"#),
            vec!["-m", "comment", "--comment", r#"a "b" c"#, "-j", "X"]
        );
        assert_eq!(shell_words(r#"--comment """#), vec!["--comment", ""]);
    }
}
