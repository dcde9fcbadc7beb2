//! Listings that page: `--limit N`, `--all` (follows page tokens to the end),
//! `--page-token T` (go on where an earlier listing stopped) and `--page-size N`.
//!
//! Each request asks for no more than is still wanted, so when `--limit` cuts a listing
//! the server's `next_page_token` points exactly after the last item printed: the hint
//! (`more: use --all or --page-token T`, on stderr) and `next_page_token` in `-o json`
//! continue without a gap or a repeat.

use std::future::Future;

use serde_json::{Value, json};

/// The paging flags of a listing.
#[derive(Debug, Clone, clap::Args)]
pub struct PageArgs {
    /// Show at most N items (the first N, newest first).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub limit: usize,
    /// Show every item, following page tokens to the end (ignores --limit).
    #[arg(long)]
    pub all: bool,
    /// Go on where an earlier listing stopped: the token its `more:` hint (or its
    /// `next_page_token` in -o json) gave. The filters must be the same.
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Items per request to the server (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub page_size: u16,
}

impl Default for PageArgs {
    fn default() -> Self {
        Self {
            limit: 50,
            all: false,
            page_token: None,
            page_size: 100,
        }
    }
}

/// What a listing fetched: its items and, when it stopped before the end, the token
/// of the rest (empty when there is no more).
#[derive(Debug)]
pub struct Listing<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

impl<T> Listing<T> {
    /// The `-o json|yaml` document: `{"<kind>": [...], "next_page_token": "…"}`, the shape
    /// of the List RPC's response (the token is empty at the end).
    pub fn document(&self, kind: &str, item: impl Fn(&T) -> Value) -> Value {
        json!({
            kind: self.items.iter().map(item).collect::<Vec<_>>(),
            "next_page_token": self.next_page_token,
        })
    }

    /// The hint on stderr when the listing was cut, for text output.
    pub fn hint(&self) -> Option<String> {
        (!self.next_page_token.is_empty())
            .then(|| format!("more: use --all or --page-token {}", self.next_page_token))
    }

    /// Prints [`Self::hint`] on stderr, if there is one.
    pub fn print_hint(&self) {
        if let Some(hint) = self.hint() {
            eprintln!("{hint}");
        }
    }
}

/// Fetches pages as `args` asks: `fetch(page_token, page_size)` returns one page's items
/// and its `next_page_token`.
pub async fn fetch<T, F, Fut>(args: &PageArgs, mut fetch: F) -> Result<Listing<T>, tonic::Status>
where
    F: FnMut(String, i32) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let wanted = if args.all { usize::MAX } else { args.limit };
    let mut items = Vec::new();
    let mut token = args.page_token.clone().unwrap_or_default();
    while items.len() < wanted {
        // Never more than is still wanted: the server's token then resumes right after
        // the last item kept.
        let size = usize::from(args.page_size).min(wanted - items.len());
        let (page, next) = fetch(token, i32::try_from(size).unwrap_or(i32::MAX)).await?;
        items.extend(page);
        token = next;
        if token.is_empty() {
            break;
        }
    }
    Ok(Listing {
        items,
        next_page_token: token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server with `total` items numbered from 0, whose token is the next index.
    async fn list(args: PageArgs, total: usize) -> (Listing<usize>, Vec<i32>) {
        let mut sizes = Vec::new();
        let listing = fetch(&args, |token, size| {
            sizes.push(size);
            let start: usize = token.parse().unwrap_or(0);
            let end = (start + usize::try_from(size).unwrap()).min(total);
            let next = if end < total {
                end.to_string()
            } else {
                String::new()
            };
            async move { Ok(((start..end).collect(), next)) }
        })
        .await
        .expect("pages");
        (listing, sizes)
    }

    #[tokio::test]
    async fn a_limit_cuts_at_a_page_boundary_and_says_where_the_rest_starts() {
        let args = PageArgs {
            limit: 5,
            page_size: 2,
            ..PageArgs::default()
        };
        let (listing, sizes) = list(args, 9).await;
        assert_eq!(listing.items, vec![0, 1, 2, 3, 4]);
        assert_eq!(sizes, vec![2, 2, 1]);
        assert_eq!(listing.next_page_token, "5");
        assert_eq!(
            listing.hint().as_deref(),
            Some("more: use --all or --page-token 5")
        );
    }

    #[tokio::test]
    async fn all_follows_every_token_and_a_token_resumes() {
        let all = PageArgs {
            all: true,
            limit: 1,
            page_size: 4,
            ..PageArgs::default()
        };
        let (listing, _) = list(all, 9).await;
        assert_eq!(listing.items, (0..9).collect::<Vec<_>>());
        assert_eq!(listing.hint(), None);
        let rest = PageArgs {
            page_token: Some("7".into()),
            ..PageArgs::default()
        };
        let (listing, _) = list(rest, 9).await;
        assert_eq!(listing.items, vec![7, 8]);
        assert_eq!(
            listing.document("n", |n| json!(n)),
            json!({"n": [7, 8], "next_page_token": ""})
        );
    }
}
