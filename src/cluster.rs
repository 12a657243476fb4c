//! Density clustering for `semtel discover`: HDBSCAN over an approximate k-nearest-neighbour
//! graph.
//!
//! The number of clusters is found, not given, and rows in no dense region stay unclustered
//! (noise). The algorithm is Campello, Moulavi and Sander's HDBSCAN with excess-of-mass cluster
//! selection, as scikit-learn and the `hdbscan` package implement it, with one change that makes
//! it scale: the minimum spanning tree of mutual-reachability distances is built from the k
//! nearest neighbours of every row (from usearch) instead of all n² pairs. With k a few times
//! `min_samples` the kNN graph holds nearly every edge the exact tree uses; components the graph
//! leaves apart are joined at an infinite distance (they can only be separate clusters or noise).
//! `tests/discover.rs` checks the labels against scikit-learn's on the same vectors.
//!
//! This module must never read files, embed text or call an LLM: it takes vectors and returns
//! labels.

use crate::{Error, Result};
use rayon::prelude::*;

/// The two density parameters (scikit-learn's names and meanings).
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// The smallest group of rows that counts as a cluster.
    pub min_cluster_size: usize,
    /// How conservative the density estimate is: a row's core distance is the distance to its
    /// `min_samples`-th nearest row, counting itself.
    pub min_samples: usize,
    /// Neighbours per row in the graph (at least `min_samples`).
    pub k: usize,
    /// How clusters are chosen from the condensed tree.
    pub selection: Selection,
}

/// scikit-learn's `cluster_selection_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Excess of mass: the most persistent clusters; on text embeddings it tends to keep one
    /// large parent over its many topics.
    Eom,
    /// The leaves of the condensed tree: the finest dense groups of at least
    /// `min_cluster_size` rows.
    Leaf,
}

impl Params {
    pub fn new(min_cluster_size: usize, min_samples: usize) -> Params {
        let min_cluster_size = min_cluster_size.max(2);
        let min_samples = min_samples.max(1);
        Params {
            min_cluster_size,
            min_samples,
            // Enough neighbours that the spanning tree rarely needs an edge the graph lacks
            // (measured in tests/discover.rs against the exact algorithm).
            k: (2 * min_samples).max(24),
            selection: Selection::Eom,
        }
    }
}

/// The outcome: a cluster per row (`-1` = noise), clusters numbered by size, largest first.
#[derive(Debug, Clone)]
pub struct Clustering {
    pub labels: Vec<i32>,
    /// How firmly each row belongs to its cluster (0–1; 0 for noise), HDBSCAN's probability.
    pub strength: Vec<f32>,
    /// Excess-of-mass stability of each cluster (same numbering as `labels`).
    pub stability: Vec<f64>,
    pub n_clusters: usize,
}

/// A row's neighbours: (row, Euclidean distance), nearest first, itself excluded.
pub type Neighbours = Vec<Vec<(u32, f32)>>;

/// Exact search up to this many rows (n² dot products are cheap there); usearch beyond.
const EXACT_LIMIT: usize = 4_000;

/// The `k` nearest neighbours of every row of `vectors` (`n × dims`, row-major), by Euclidean
/// distance. Unit vectors (what semtel's encoders give) make this the cosine ordering.
pub fn knn_graph(vectors: &[f32], dims: usize, k: usize) -> Result<Neighbours> {
    knn_graph_with_index(vectors, dims, k).map(|(g, _)| g)
}

/// The graph and, past the exact-search limit, the usearch index it came from (for more
/// searches: joining the parts the graph leaves apart).
fn knn_graph_with_index(
    vectors: &[f32],
    dims: usize,
    k: usize,
) -> Result<(Neighbours, Option<usearch::Index>)> {
    if dims == 0 || !vectors.len().is_multiple_of(dims) {
        return Err(Error::Config(format!(
            "cluster: {} values are not rows of {dims} dimensions",
            vectors.len()
        )));
    }
    let n = vectors.len() / dims;
    let k = k.min(n.saturating_sub(1));
    if n == 0 || k == 0 {
        return Ok((vec![Vec::new(); n], None));
    }
    if n <= EXACT_LIMIT {
        return Ok((exact_knn(vectors, dims, k), None));
    }
    use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};
    let opts = IndexOptions {
        dimensions: dims,
        metric: MetricKind::L2sq,
        quantization: ScalarKind::F32,
        connectivity: 16,
        expansion_add: 128,
        expansion_search: (2 * k).max(64),
        multi: false,
    };
    let index = usearch::Index::new(&opts)
        .map_err(|e| Error::vector_index("creating the neighbour graph", e))?;
    index
        .reserve_capacity_and_threads(n, rayon::current_num_threads().max(1))
        .map_err(|e| Error::vector_index("reserving the neighbour graph", e))?;
    vectors
        .par_chunks(dims)
        .enumerate()
        .try_for_each(|(i, v)| index.add(i as u64, v))
        .map_err(|e| Error::vector_index("adding to the neighbour graph", e))?;
    let graph = vectors
        .par_chunks(dims)
        .enumerate()
        .map(|(i, v)| {
            let m = index
                .search(v, k + 1)
                .map_err(|e| Error::vector_index("searching the neighbour graph", e))?;
            Ok(m.keys
                .iter()
                .zip(&m.distances)
                .filter(|(&key, _)| key as usize != i && (key as usize) < n)
                .take(k)
                .map(|(&key, &d)| (key as u32, d.max(0.0).sqrt()))
                .collect())
        })
        .collect::<Result<Neighbours>>()?;
    Ok((graph, Some(index)))
}

/// HDBSCAN of `vectors` (`n × dims`). Up to a few thousand rows the spanning tree is exact
/// (all pairs, as scikit-learn); beyond, it comes from the neighbour graph, with the parts the
/// graph leaves apart joined by their true nearest cross edges (searched from a few rows of
/// every part but the largest), so separate groups meet at the distance that really separates
/// them. The graph's known limit: a cluster whose rows' neighbour lists stay inside it is
/// joined to the rest by the shortest path the lists offer, which can run through sparse rows
/// and be longer than the true gap (measured against scikit-learn in tests/discover.rs and
/// benches/discover.sh).
pub fn cluster(vectors: &[f32], dims: usize, p: &Params) -> Result<Clustering> {
    let (graph, index) = knn_graph_with_index(vectors, dims, p.k)?;
    let d = dims;
    let joiner = |comp: &[u32], core: &[f32]| -> Vec<(f32, u32, u32)> {
        let mut by: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
        for (i, &c) in comp.iter().enumerate() {
            by.entry(c).or_default().push(i as u32);
        }
        let largest = by
            .iter()
            .max_by_key(|(c, m)| (m.len(), std::cmp::Reverse(**c)))
            .map(|(c, _)| *c);
        let mut samples: Vec<u32> = Vec::new();
        for (c, m) in &by {
            if Some(*c) == largest {
                continue;
            }
            let step = m.len().div_ceil(8).max(1);
            samples.extend(m.iter().step_by(step).copied());
        }
        samples
            .par_iter()
            .flat_map_iter(|&a| {
                let q = &vectors[a as usize * d..(a as usize + 1) * d];
                let own = comp[a as usize];
                let near: Vec<(u32, f32)> = match &index {
                    None => {
                        let mut best: Vec<(u32, f32)> = Vec::with_capacity(3);
                        for (j, row) in vectors.chunks(d).enumerate() {
                            if comp[j] == own {
                                continue;
                            }
                            let s: f32 = q.iter().zip(row).map(|(x, y)| (x - y) * (x - y)).sum();
                            best.push((j as u32, s.sqrt()));
                            best.sort_by(|x, y| x.1.total_cmp(&y.1));
                            best.truncate(2);
                        }
                        best
                    }
                    Some(ix) => ix
                        .filtered_search(q, 2, |key| {
                            (key as usize) < comp.len() && comp[key as usize] != own
                        })
                        .map(|m| {
                            m.keys
                                .iter()
                                .zip(&m.distances)
                                .filter(|(&k, _)| {
                                    (k as usize) < comp.len() && comp[k as usize] != own
                                })
                                .map(|(&k, &dist)| (k as u32, dist.max(0.0).sqrt()))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                near.into_iter().map(move |(b, dist)| {
                    (
                        dist.max(core[a as usize]).max(core[b as usize]),
                        a.min(b),
                        a.max(b),
                    )
                })
            })
            .collect()
    };
    // Small inputs get the exact tree (the neighbour lists only give core distances there).
    let exact = index.is_none().then_some((vectors, dims));
    Ok(hdbscan_joined(&graph, p, Some(&joiner), exact))
}

/// Given a component id per row and the core distances, cross edges (weight, a, b) between
/// components.
type Joiner<'a> = &'a (dyn Fn(&[u32], &[f32]) -> Vec<(f32, u32, u32)> + Sync);

fn exact_knn(vectors: &[f32], dims: usize, k: usize) -> Neighbours {
    let n = vectors.len() / dims;
    (0..n)
        .into_par_iter()
        .map(|i| {
            let a = &vectors[i * dims..(i + 1) * dims];
            let mut d: Vec<(u32, f32)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let b = &vectors[j * dims..(j + 1) * dims];
                    let s: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
                    (j as u32, s.sqrt())
                })
                .collect();
            let k = k.min(d.len());
            if k < d.len() {
                d.select_nth_unstable_by(k, |x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)));
                d.truncate(k);
            }
            d.sort_by(|x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)));
            d
        })
        .collect()
}

struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    fn new(n: usize) -> UnionFind {
        UnionFind {
            parent: (0..n as u32).collect(),
        }
    }
    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }
}

/// One merge of the single-linkage tree: nodes `0..n` are rows, node `n + i` is merge `i`.
#[derive(Debug, Clone, Copy)]
struct Merge {
    left: u32,
    right: u32,
    dist: f32,
    size: u32,
}

/// HDBSCAN on a neighbour graph (see [`knn_graph`]).
pub fn hdbscan(graph: &Neighbours, p: &Params) -> Clustering {
    hdbscan_joined(graph, p, None, None)
}

/// The exact minimum spanning tree of mutual-reachability distances over all pairs (Prim's
/// algorithm, O(n²·dims)): what scikit-learn computes, affordable for a few thousand rows.
fn prim_edges(vectors: &[f32], dims: usize, core: &[f32]) -> Vec<(f32, u32, u32)> {
    let n = core.len();
    let mut in_tree = vec![false; n];
    let mut best = vec![(f32::INFINITY, 0u32); n];
    let mut edges = Vec::with_capacity(n.saturating_sub(1));
    let mut u = 0usize;
    for _ in 1..n {
        in_tree[u] = true;
        let a = &vectors[u * dims..(u + 1) * dims];
        let cu = core[u];
        best.par_iter_mut()
            .enumerate()
            .with_min_len(256)
            .for_each(|(j, b)| {
                if j == u {
                    return;
                }
                let row = &vectors[j * dims..(j + 1) * dims];
                let d: f32 = a
                    .iter()
                    .zip(row)
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum::<f32>()
                    .sqrt();
                let w = d.max(cu).max(core[j]);
                if w < b.0 {
                    *b = (w, u as u32);
                }
            });
        let mut next = usize::MAX;
        let mut nw = f32::INFINITY;
        for (j, b) in best.iter().enumerate() {
            if !in_tree[j] && (next == usize::MAX || b.0 < nw) {
                next = j;
                nw = b.0;
            }
        }
        if next == usize::MAX {
            break;
        }
        let p = best[next].1;
        edges.push((nw, p.min(next as u32), p.max(next as u32)));
        u = next;
    }
    edges
}

fn hdbscan_joined(
    graph: &Neighbours,
    p: &Params,
    joiner: Option<Joiner>,
    exact: Option<(&[f32], usize)>,
) -> Clustering {
    let n = graph.len();
    let noise = || Clustering {
        labels: vec![-1; n],
        strength: vec![0.0; n],
        stability: Vec::new(),
        n_clusters: 0,
    };
    if n < p.min_cluster_size.max(2) {
        return noise();
    }
    // Core distance: the distance to the min_samples-th nearest row, the row itself first.
    let core: Vec<f32> = graph
        .iter()
        .map(|nb| {
            if p.min_samples <= 1 {
                0.0
            } else {
                nb.get(p.min_samples - 2)
                    .or(nb.last())
                    .map_or(f32::INFINITY, |x| x.1)
            }
        })
        .collect();
    // Mutual-reachability edges of the graph, Kruskal's spanning forest.
    let mut edges: Vec<(f32, u32, u32)> = graph
        .iter()
        .enumerate()
        .flat_map(|(i, nb)| {
            let core = &core;
            nb.iter().filter_map(move |&(j, d)| {
                let (a, b) = (i as u32, j);
                (a != b).then(|| (d.max(core[i]).max(core[j as usize]), a.min(b), a.max(b)))
            })
        })
        .collect();
    if let Some((v, d)) = exact {
        edges = prim_edges(v, d, &core);
    }
    let sort = |e: &mut Vec<(f32, u32, u32)>| {
        e.par_sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2))));
        e.dedup_by(|a, b| a.1 == b.1 && a.2 == b.2);
    };
    sort(&mut edges);
    // Parts the graph leaves apart: add their nearest cross edges (a few rounds), then build
    // the tree from all edges in order (Kruskal needs them sorted together).
    if let Some(join) = joiner {
        for _ in 0..3 {
            let mut uf = UnionFind::new(n);
            let mut parts = n;
            for &(_, a, b) in &edges {
                let (ra, rb) = (uf.find(a), uf.find(b));
                if ra != rb {
                    uf.parent[rb as usize] = ra;
                    parts -= 1;
                }
            }
            if parts <= 1 {
                break;
            }
            let comp: Vec<u32> = (0..n as u32).map(|i| uf.find(i)).collect();
            let mut extra = join(&comp, &core);
            if extra.is_empty() {
                break;
            }
            edges.append(&mut extra);
            sort(&mut edges);
        }
    }
    let mut uf = UnionFind::new(n);
    let mut node_of: Vec<u32> = (0..n as u32).collect(); // root row → its tree node
    let mut size_of: Vec<u32> = vec![1; 2 * n];
    let mut merges: Vec<Merge> = Vec::with_capacity(n.saturating_sub(1));
    let mut join = |uf: &mut UnionFind, merges: &mut Vec<Merge>, a: u32, b: u32, dist: f32| {
        let (ra, rb) = (uf.find(a), uf.find(b));
        if ra == rb {
            return;
        }
        let (na, nb) = (node_of[ra as usize], node_of[rb as usize]);
        let size = size_of[na as usize] + size_of[nb as usize];
        let id = (n + merges.len()) as u32;
        size_of[id as usize] = size;
        merges.push(Merge {
            left: na,
            right: nb,
            dist,
            size,
        });
        uf.parent[rb as usize] = ra;
        node_of[ra as usize] = id;
    };
    for &(w, a, b) in &edges {
        join(&mut uf, &mut merges, a, b, w);
        if merges.len() + 1 == n {
            break;
        }
    }
    // Parts the graph left apart meet at infinity (λ = 0): they never share a cluster.
    if merges.len() + 1 < n {
        let first = uf.find(0);
        for r in 1..n as u32 {
            join(&mut uf, &mut merges, first, r, f32::INFINITY);
        }
    }
    condense_and_select(n, &merges, p.min_cluster_size, p.selection)
}

/// One row of the condensed tree: `child` (a row `< n` or a cluster `>= n`) leaves `parent` at
/// density `lambda` (1 / distance) with `size` rows.
#[derive(Debug, Clone, Copy)]
struct Condensed {
    parent: u32,
    child: u32,
    lambda: f64,
    size: u32,
}

/// Density of a merge. Identical rows (distance 0: the same conversation sent many times) get a
/// large finite density rather than infinity, so stabilities stay comparable sums.
fn lambda_of(dist: f32) -> f64 {
    if dist.is_infinite() {
        0.0
    } else {
        1.0 / (dist as f64).max(1e-6)
    }
}

fn condense_and_select(n: usize, merges: &[Merge], mcs: usize, sel: Selection) -> Clustering {
    let size = |node: u32| -> u32 {
        if (node as usize) < n {
            1
        } else {
            merges[node as usize - n].size
        }
    };
    // Rows under a tree node, without recursion (trees of 200k rows are deep).
    let leaves = |node: u32, out: &mut Vec<u32>| {
        let mut stack = vec![node];
        while let Some(x) = stack.pop() {
            if (x as usize) < n {
                out.push(x);
            } else {
                let m = &merges[x as usize - n];
                stack.push(m.left);
                stack.push(m.right);
            }
        }
    };
    let root = (n + merges.len() - 1) as u32;
    let mut tree: Vec<Condensed> = Vec::with_capacity(2 * n);
    let mut next_cluster = n as u32 + 1;
    // (tree node, the cluster it belongs to), top-down.
    let mut queue: std::collections::VecDeque<(u32, u32)> =
        std::collections::VecDeque::from([(root, n as u32)]);
    let mut fallen = Vec::new();
    while let Some((node, cluster)) = queue.pop_front() {
        if (node as usize) < n {
            continue;
        }
        let m = merges[node as usize - n];
        let lambda = lambda_of(m.dist);
        let (ls, rs) = (size(m.left), size(m.right));
        let big_l = ls as usize >= mcs;
        let big_r = rs as usize >= mcs;
        let mut fall = |child: u32, tree: &mut Vec<Condensed>| {
            fallen.clear();
            leaves(child, &mut fallen);
            for &r in &fallen {
                tree.push(Condensed {
                    parent: cluster,
                    child: r,
                    lambda,
                    size: 1,
                });
            }
        };
        match (big_l, big_r) {
            (true, true) => {
                for (child, s) in [(m.left, ls), (m.right, rs)] {
                    let c = next_cluster;
                    next_cluster += 1;
                    tree.push(Condensed {
                        parent: cluster,
                        child: c,
                        lambda,
                        size: s,
                    });
                    queue.push_back((child, c));
                }
            }
            (false, false) => {
                fall(m.left, &mut tree);
                fall(m.right, &mut tree);
            }
            (true, false) => {
                fall(m.right, &mut tree);
                queue.push_back((m.left, cluster));
            }
            (false, true) => {
                fall(m.left, &mut tree);
                queue.push_back((m.right, cluster));
            }
        }
    }
    let n_nodes = (next_cluster - n as u32) as usize;
    let idx = |c: u32| (c as usize) - n;
    // Birth of each cluster (root: 0), stability = Σ (λ_leave − λ_birth) × size.
    let mut birth = vec![0.0f64; n_nodes];
    let mut children: Vec<Vec<u32>> = vec![Vec::new(); n_nodes];
    for t in &tree {
        if t.child as usize >= n {
            birth[idx(t.child)] = t.lambda;
            children[idx(t.parent)].push(t.child);
        }
    }
    let mut stability = vec![0.0f64; n_nodes];
    let mut max_lambda = vec![0.0f64; n_nodes];
    for t in &tree {
        let p = idx(t.parent);
        stability[p] += (t.lambda - birth[p]) * t.size as f64;
        if t.child < n as u32 {
            max_lambda[p] = max_lambda[p].max(t.lambda);
        }
    }
    // Excess of mass, bottom-up (children have larger ids than their parents); never the root.
    let mut selected = vec![false; n_nodes];
    let mut value = stability.clone();
    for c in (1..n_nodes).rev() {
        if sel == Selection::Leaf {
            selected[c] = children[c].is_empty();
            continue;
        }
        let sub: f64 = children[c].iter().map(|&ch| value[idx(ch)]).sum();
        if !children[c].is_empty() && sub > stability[c] {
            value[c] = sub;
        } else {
            selected[c] = true;
            let mut stack = children[c].clone();
            while let Some(x) = stack.pop() {
                selected[idx(x)] = false;
                stack.extend(children[idx(x)].iter().copied());
            }
        }
    }
    // Each cluster's selected ancestor (itself when selected).
    let mut owner: Vec<Option<usize>> = vec![None; n_nodes];
    for c in 1..n_nodes {
        // Parents come first in id order, so the parent's owner is known.
        if selected[c] {
            owner[c] = Some(c);
        }
    }
    let mut parent_of = vec![0u32; n_nodes];
    for t in &tree {
        if t.child as usize >= n {
            parent_of[idx(t.child)] = t.parent;
        }
    }
    for c in 1..n_nodes {
        if owner[c].is_none() {
            owner[c] = owner[idx(parent_of[c])];
        }
    }
    // Number the selected clusters by size, largest first.
    let mut raw = vec![-1i64; n];
    let mut lam = vec![0.0f64; n];
    for t in &tree {
        if (t.child as usize) < n {
            if let Some(o) = owner[idx(t.parent)] {
                raw[t.child as usize] = o as i64;
                lam[t.child as usize] = t.lambda;
            }
        }
    }
    // Deaths: the densest level a selected cluster's rows reach (its subtree's maximum).
    let mut death = vec![0.0f64; n_nodes];
    for c in (1..n_nodes).rev() {
        let d = max_lambda[c].max(death[c]);
        death[c] = d;
        let p = idx(parent_of[c]);
        death[p] = death[p].max(d);
    }
    let mut counts: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    for &r in &raw {
        if r >= 0 {
            *counts.entry(r).or_default() += 1;
        }
    }
    let mut order: Vec<(i64, usize)> = counts.into_iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut renum = std::collections::HashMap::new();
    let mut stab = Vec::with_capacity(order.len());
    for (new, (old, _)) in order.iter().enumerate() {
        renum.insert(*old, new as i32);
        stab.push(stability[*old as usize]);
    }
    let labels: Vec<i32> = raw
        .iter()
        .map(|r| if *r >= 0 { renum[r] } else { -1 })
        .collect();
    let strength: Vec<f32> = raw
        .iter()
        .zip(&lam)
        .map(|(r, &l)| {
            if *r < 0 {
                return 0.0;
            }
            let d = death[*r as usize];
            if d <= 0.0 || !l.is_finite() || !d.is_finite() {
                1.0
            } else {
                (l.min(d) / d) as f32
            }
        })
        .collect();
    Clustering {
        n_clusters: order.len(),
        labels,
        strength,
        stability: stab,
    }
}

/// `vectors` (`n × dims`) on their `k` principal axes (subspace iteration on the covariance),
/// each row scaled to unit length again: density estimates on a few dozen dimensions suffer
/// less from distance concentration than on hundreds.
pub fn pca_reduce(vectors: &[f32], dims: usize, k: usize) -> Vec<f32> {
    let n = vectors.len() / dims.max(1);
    let k = k.min(dims).max(1);
    if n == 0 {
        return Vec::new();
    }
    let mut mean = vec![0.0f64; dims];
    for row in vectors.chunks(dims) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += *x as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    // Covariance (dims × dims), summed over row chunks in parallel.
    let cov = vectors
        .par_chunks(dims * 512)
        .map(|chunk| {
            let mut c = vec![0.0f64; dims * dims];
            let mut x = vec![0.0f64; dims];
            for row in chunk.chunks(dims) {
                for (xi, (r, m)) in x.iter_mut().zip(row.iter().zip(&mean)) {
                    *xi = *r as f64 - m;
                }
                for i in 0..dims {
                    let xi = x[i];
                    let ci = &mut c[i * dims..(i + 1) * dims];
                    for (cij, xj) in ci.iter_mut().zip(&x) {
                        *cij += xi * xj;
                    }
                }
            }
            c
        })
        .reduce(
            || vec![0.0f64; dims * dims],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    // Subspace iteration from a fixed start: Q ← orth(C·Q).
    let mut q: Vec<Vec<f64>> = (0..k)
        .map(|j| {
            (0..dims)
                .map(|i| (((i * 31 + j * 17) % 97) as f64) / 97.0 - 0.5)
                .collect()
        })
        .collect();
    for _ in 0..40 {
        let mut z: Vec<Vec<f64>> = q
            .par_iter()
            .map(|v| {
                (0..dims)
                    .map(|i| {
                        cov[i * dims..(i + 1) * dims]
                            .iter()
                            .zip(v)
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect()
            })
            .collect();
        for j in 0..k {
            for p in 0..j {
                let d: f64 = z[j].iter().zip(&z[p]).map(|(a, b)| a * b).sum();
                let (head, tail) = z.split_at_mut(j);
                for (a, b) in tail[0].iter_mut().zip(&head[p]) {
                    *a -= d * b;
                }
            }
            let norm = z[j].iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                z[j].iter_mut().for_each(|x| *x /= norm);
            }
        }
        q = z;
    }
    let mut out = vec![0.0f32; n * k];
    out.par_chunks_mut(k)
        .zip(vectors.par_chunks(dims))
        .for_each(|(o, row)| {
            for (oj, qj) in o.iter_mut().zip(&q) {
                *oj = row
                    .iter()
                    .zip(&mean)
                    .zip(qj)
                    .map(|((r, m), w)| (*r as f64 - m) * w)
                    .sum::<f64>() as f32;
            }
            let norm = o.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                o.iter_mut().for_each(|x| *x /= norm);
            }
        });
    out
}

/// Adjusted Rand index of two labellings (noise, `-1`, is one more label), for comparing a
/// clustering with a reference.
pub fn adjusted_rand_index(a: &[i32], b: &[i32]) -> f64 {
    use std::collections::HashMap;
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    let c2 = |x: f64| x * (x - 1.0) / 2.0;
    let mut joint: HashMap<(i32, i32), f64> = HashMap::new();
    let mut ra: HashMap<i32, f64> = HashMap::new();
    let mut rb: HashMap<i32, f64> = HashMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *joint.entry((x, y)).or_default() += 1.0;
        *ra.entry(x).or_default() += 1.0;
        *rb.entry(y).or_default() += 1.0;
    }
    let sum_ij: f64 = joint.values().map(|&v| c2(v)).sum();
    let sum_a: f64 = ra.values().map(|&v| c2(v)).sum();
    let sum_b: f64 = rb.values().map(|&v| c2(v)).sum();
    let expected = sum_a * sum_b / c2(n).max(1.0);
    let max = (sum_a + sum_b) / 2.0;
    if (max - expected).abs() < 1e-12 {
        return 1.0;
    }
    (sum_ij - expected) / (max - expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three tight blobs on a line and a few stragglers between them.
    fn blobs() -> (Vec<f32>, Vec<i32>) {
        let mut v = Vec::new();
        let mut truth = Vec::new();
        let mut s = 7u64;
        let mut r = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 10_000) as f32 / 10_000.0 - 0.5
        };
        for (c, centre) in [0.0f32, 10.0, 20.0].iter().enumerate() {
            for _ in 0..40 {
                v.extend([centre + r(), r()]);
                truth.push(c as i32);
            }
        }
        for x in [5.0f32, 15.0] {
            v.extend([x, 30.0]);
            truth.push(-1);
        }
        (v, truth)
    }

    #[test]
    fn finds_the_blobs_and_leaves_stragglers_as_noise() {
        let (v, truth) = blobs();
        let p = Params::new(10, 5);
        let c = cluster(&v, 2, &p).unwrap();
        assert_eq!(c.n_clusters, 3, "{:?}", c.labels);
        assert_eq!(c.labels[120], -1);
        assert_eq!(c.labels[121], -1);
        assert!(adjusted_rand_index(&c.labels, &truth) > 0.99);
        assert!(c.strength.iter().all(|s| (0.0..=1.0).contains(s)));
    }

    #[test]
    fn degenerate_inputs_never_panic() {
        let p = Params::new(5, 3);
        for n in [0usize, 1, 2, 4, 5, 6] {
            let v = vec![0.5f32; n * 3];
            let g = knn_graph(&v, 3, p.k).unwrap();
            let c = hdbscan(&g, &p);
            assert_eq!(c.labels.len(), n);
        }
        // All rows identical: one cluster or all noise, never a panic.
        let v = vec![1.0f32; 100 * 4];
        let g = knn_graph(&v, 4, p.k).unwrap();
        let c = hdbscan(&g, &p);
        assert_eq!(c.labels.len(), 100);
        assert!(knn_graph(&[1.0, 2.0, 3.0], 2, 3).is_err());
    }

    #[test]
    fn a_disconnected_graph_still_clusters() {
        // Two far groups with k too small to link them: joined at infinity, two clusters.
        let mut v = Vec::new();
        for i in 0..30 {
            v.extend([i as f32 * 0.01, 0.0]);
        }
        for i in 0..30 {
            v.extend([1000.0 + i as f32 * 0.01, 0.0]);
        }
        let p = Params {
            k: 4,
            ..Params::new(10, 3)
        };
        let g = knn_graph(&v, 2, p.k).unwrap();
        let c = hdbscan(&g, &p);
        assert_eq!(c.n_clusters, 2, "{:?}", c.labels);
        // Joined by their true nearest edge instead: still two clusters.
        let c = cluster(&v, 2, &p).unwrap();
        assert_eq!(c.n_clusters, 2, "{:?}", c.labels);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, failure_persistence: None, ..Default::default() })]
        /// Any set of rows (duplicates, a single point repeated, tiny or huge values) gets one
        /// label each, noise or a cluster of at least min_cluster_size rows, without a panic.
        #[test]
        fn any_rows_get_one_label_each(
            rows in proptest::collection::vec(proptest::collection::vec(-3.0f32..3.0, 3), 0..120),
            mcs in 2usize..12,
            ms in 1usize..8,
        ) {
            let v: Vec<f32> = rows.iter().flatten().copied().collect();
            let p = Params::new(mcs, ms);
            let c = cluster(&v, 3, &p).unwrap();
            proptest::prop_assert_eq!(c.labels.len(), rows.len());
            let mut sizes = std::collections::HashMap::new();
            for &l in &c.labels {
                proptest::prop_assert!(l >= -1 && l < c.n_clusters as i32);
                *sizes.entry(l).or_insert(0usize) += 1;
            }
            for (l, s) in sizes {
                if l >= 0 {
                    proptest::prop_assert!(s >= p.min_cluster_size);
                }
            }
            // Clusters are numbered by size, largest first.
            let counts: Vec<usize> = (0..c.n_clusters as i32).map(|k| c.labels.iter().filter(|&&l| l == k).count()).collect();
            proptest::prop_assert!(counts.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn ari_is_one_for_equal_partitions_and_near_zero_for_unrelated() {
        let a = [0, 0, 1, 1, 2, 2];
        let b = [5, 5, 3, 3, 9, 9];
        assert!((adjusted_rand_index(&a, &b) - 1.0).abs() < 1e-9);
        let c = [0, 1, 0, 1, 0, 1];
        assert!(adjusted_rand_index(&a, &c) < 0.1);
    }
}
